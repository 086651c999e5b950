//! `[[test]]` cases: decisions a policy's author expects, kept beside the rules so that a policy
//! change is reviewed like code (`tollgate policy test FILE`). The agent ignores them.
//!
//! A case names who (an identity, or the kernel facts the agent would attribute), the target,
//! at most one operation (none: the connection itself) and the expected action, optionally the
//! deciding rule. The operation is kept as written: SQL text is classified by the agent's
//! classifier, which this pure crate does not have.

use crate::model::Action;

/// One `[[test]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCase {
    /// Key `name`: what the case checks, named in failures.
    pub name: String,
    /// 1-based line of the case's `name` in the file.
    pub line: usize,
    /// Key `identity` or `facts`.
    pub who: CaseWho,
    /// Key `target`: a target name of the policy.
    pub target: String,
    /// Key `sql`, `ssh`, `http` or `kubernetes`; none: the connection.
    pub op: CaseOp,
    /// Key `expect`.
    pub expect: Action,
    /// Key `rule`: `Some("")` expects a denial no rule made; `None` does not check the rule.
    pub rule: Option<String>,
}

/// Who a case is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseWho {
    /// Key `identity`: an identity name of the policy.
    Identity(String),
    /// Key `facts`: kernel facts, attributed with [`crate::Policy::identify`].
    Facts(CaseFacts),
}

/// `facts = { cgroup, uid, user, exe, comm }` (unset: `/`, uid 65534, none, none, `""`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseFacts {
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// Real uid.
    pub uid: Option<u32>,
    /// User name.
    pub user: Option<String>,
    /// Executable path.
    pub exe: Option<String>,
    /// Command name.
    pub comm: Option<String>,
}

impl CaseFacts {
    /// The facts as [`crate::WorkloadFacts`] (the agent's own user namespace).
    pub fn workload(&self) -> crate::WorkloadFacts<'_> {
        crate::WorkloadFacts {
            cgroup: self.cgroup.as_deref().unwrap_or("/"),
            uid: self.uid.unwrap_or(65534),
            user: self.user.as_deref(),
            exe: self.exe.as_deref(),
            comm: self.comm.as_deref().unwrap_or(""),
            foreign_userns: false,
        }
    }
}

/// The operation of a case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOp {
    /// Opening the connection.
    Connect,
    /// One SQL string, as a client would send it.
    Sql(String),
    /// One SSH request: kind and command (exec line, subsystem, forward destination).
    Ssh(crate::SshOpKind, String),
    /// One HTTP request.
    Http {
        /// Method.
        method: String,
        /// Path.
        path: String,
        /// Host.
        host: String,
    },
    /// One Kubernetes API request.
    Kube {
        /// Verb.
        verb: String,
        /// Resource (`pods/exec`).
        resource: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The command of a `pods/exec`, one string per argument.
        command: Option<Vec<String>>,
    },
}
