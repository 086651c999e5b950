//! Approvals for every handler: open a request under the operation's policy snapshot, hold
//! the operation while the broker decides, withdraw it when the client goes away.

use std::{future::Future, time::Duration};

use serde_json::json;
use tollgate_policy::Decision;

use super::{Generation, SessionCx};
use crate::{approvals::Ticket, obj, recording::Recorder};

/// What an approval request came to. `Unavailable` (no broker on this agent: no admin
/// listener to approve through) must be treated as a deny with a clear message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    /// Approved by these distinct approvers (subjects).
    Approved {
        id: u64,
        approvers: Vec<String>,
    },
    /// Denied by `approver`, with an optional comment.
    Denied {
        id: u64,
        approver: String,
        comment: Option<String>,
    },
    /// Nobody decided within the rule's `timeout` (or the request was closed otherwise).
    Expired {
        id: u64,
        reason: String,
    },
    Unavailable,
}

impl ApprovalOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ApprovalOutcome::Approved { .. } => "approved",
            ApprovalOutcome::Denied { .. } => "denied",
            ApprovalOutcome::Expired { .. } => "expired",
            ApprovalOutcome::Unavailable => "unavailable",
        }
    }

    pub(crate) fn of(r: &crate::approvals::ApprovalRequest) -> ApprovalOutcome {
        use crate::approvals::Status;
        match r.status {
            Status::Approved => ApprovalOutcome::Approved {
                id: r.id,
                approvers: r.approvals.iter().map(|v| v.subject.clone()).collect(),
            },
            Status::Denied => ApprovalOutcome::Denied {
                id: r.id,
                approver: r
                    .denied_by
                    .as_ref()
                    .map(|v| v.subject.clone())
                    .unwrap_or_default(),
                comment: r.denied_by.as_ref().and_then(|v| v.comment.clone()),
            },
            Status::Expired | Status::Cancelled | Status::Pending => ApprovalOutcome::Expired {
                id: r.id,
                reason: r.reason.clone().unwrap_or_else(|| "expired".into()),
            },
        }
    }
}

/// Default `timeout` of an approve rule.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(300);

impl SessionCx {
    /// The approval hook, first half: hold `operation` (as the audit shows it, masked) for a
    /// human under `decision` (an `approve` decision naming its rule), with the approvers,
    /// quorum and timeout of that rule in `gen`, the snapshot the decision was made under.
    /// `Err` with the reason when this agent has no broker or its store is unavailable: the
    /// handler refuses the operation with that message (fail closed). The request is
    /// cancelled if the returned ticket is dropped before it is decided.
    pub async fn open_approval(
        &self,
        gen: &Generation,
        operation: &str,
        kind: &str,
        decision: &Decision,
    ) -> Result<Ticket, String> {
        let Some(broker) = self.agent.approvals.clone() else {
            return Err("approval is not available on this agent".into());
        };
        let req = {
            let rule_name = decision.rule.clone().unwrap_or_default();
            let rule = gen.policy.rule(&rule_name);
            crate::approvals::NewRequest {
                identity: self.identity.clone(),
                // A workload that presented a token is also known by its subject: an approver
                // with that subject is the requester and cannot decide the request.
                workload_subject: self
                    .claims
                    .get()
                    .and_then(|c| c.get("sub"))
                    .and_then(|v| v.first().cloned()),
                target: self.target.name.clone(),
                protocol: self.target.protocol.as_str().into(),
                session: self.id.clone(),
                operation: operation.to_string(),
                kind: kind.to_string(),
                rule: rule_name.to_string(),
                approvers: rule.map(|r| r.approvers.clone()).unwrap_or_default(),
                min_approvals: rule.and_then(|r| r.min_approvals).unwrap_or(1),
                timeout: rule
                    .and_then(|r| r.timeout)
                    .unwrap_or(DEFAULT_APPROVAL_TIMEOUT),
            }
        };
        broker.open(req).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot open an approval request; the operation is refused");
            e.to_string()
        })
    }

    /// The approval hook, second half: wait for approve, deny or expiry.
    pub async fn wait_approval(&self, ticket: &mut Ticket) -> ApprovalOutcome {
        ApprovalOutcome::of(&ticket.wait().await)
    }

    /// The hold every handler shares, once the client was told it waits: record the request,
    /// wait for the broker while `watch` watches the client, and record the outcome. When
    /// `watch` ends first the request is withdrawn: [`Withdrawn::Cancelled`] with its reason
    /// for the broker, [`Withdrawn::Gone`] by dropping the ticket (the broker audits it).
    pub async fn hold_approval(
        &self,
        mut ticket: Ticket,
        rule: &str,
        text: &str,
        recorder: Option<&Recorder>,
        watch: impl Future<Output = Withdrawn>,
    ) -> Result<ApprovalOutcome, Withdrawn> {
        let id = ticket.id();
        if let Some(r) = recorder {
            r.write(obj(json!({"event": "approval_requested", "session": self.id, "approval_id": id, "rule": rule, "text": text})));
        }
        let waited = {
            let wait = self.wait_approval(&mut ticket);
            tokio::pin!(wait);
            tokio::pin!(watch);
            tokio::select! {
                o = &mut wait => Ok(o),
                w = &mut watch => Err(w),
            }
        };
        match waited {
            Ok(outcome) => {
                if let Some(r) = recorder {
                    let (by, comment) = match &outcome {
                        ApprovalOutcome::Approved { approvers, .. } => (json!(approvers), None),
                        ApprovalOutcome::Denied {
                            approver, comment, ..
                        } => (json!([approver]), comment.clone()),
                        ApprovalOutcome::Expired { reason, .. } => {
                            (json!([]), Some(reason.clone()))
                        }
                        ApprovalOutcome::Unavailable => (json!([]), None),
                    };
                    r.write(obj(json!({"event": "approval", "session": self.id, "approval_id": id, "outcome": outcome.label(), "approvers": by, "comment": comment})));
                }
                Ok(outcome)
            }
            Err(w) => {
                let recorded = match w {
                    Withdrawn::Cancelled(reason) => {
                        ticket.withdraw(reason);
                        "cancelled by the client"
                    }
                    Withdrawn::Gone => {
                        // Dropping the ticket cancels the request (audited by the broker).
                        drop(ticket);
                        "client disconnected"
                    }
                };
                if let Some(r) = recorder {
                    r.write(obj(json!({"event": "approval", "session": self.id, "approval_id": id, "outcome": "cancelled", "reason": recorded})));
                }
                Err(w)
            }
        }
    }

    /// Open and wait, for handlers with nothing to tell their client meanwhile. Dropping the
    /// future cancels the request.
    pub async fn request_approval(
        &self,
        gen: &Generation,
        operation: &str,
        kind: &str,
        decision: &Decision,
    ) -> ApprovalOutcome {
        match self.open_approval(gen, operation, kind, decision).await {
            Ok(mut t) => self.wait_approval(&mut t).await,
            Err(_) => ApprovalOutcome::Unavailable,
        }
    }
}

/// Why a held operation ended before it was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    /// The client went away.
    Gone,
    /// The client withdrew the operation (a PostgreSQL CancelRequest); the reason is the
    /// broker's.
    Cancelled(&'static str),
}
