//! Builds the eBPF object with aya-build when bpf-linker is available, and otherwise emits an
//! empty stub so that `cargo check`, clippy and unit tests work on stable alone. A stub build
//! refuses to start the data path with a message naming `cargo xtask build`.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(tollgate_ebpf_stub)");
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_STUB");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    // xtask installs bpf-linker here (see `cargo xtask setup`); also honour PATH.
    let tools = env::var_os("TOLLGATE_TOOLS")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tollgate/tools")));
    if let Some(tools) = tools {
        let bin = tools.join("bin");
        if bin.join("bpf-linker").exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![bin];
            paths.extend(env::split_paths(&path));
            env::set_var("PATH", env::join_paths(paths)?);
        }
    }
    let have_linker = env::split_paths(&env::var_os("PATH").unwrap_or_default())
        .any(|p| p.join("bpf-linker").exists());
    let stub = env::var_os("TOLLGATE_EBPF_STUB").is_some_and(|v| v == "1")
        || env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1")
        || !have_linker;
    if stub {
        println!("cargo:rustc-cfg=tollgate_ebpf_stub");
        std::fs::write(out_dir.join("tollgate-ebpf"), [])?;
        return Ok(());
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tollgate-ebpf",
            root_dir: "../ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
