//! The production datapath, proven in a real kernel: Debian's kernel (with
//! wireguard.ko and vrf.ko) boots under QEMU's software emulation with this
//! machine's userland, and `tests/kernel/guest` runs inside — `doctor` in
//! both modes, the datapath's namespace tests and the labs in VRF + kernel
//! WireGuard mode, the minimal lab's drills, and the lab check with kernel
//! WireGuard in table mode. Each step's log, the guest's console and the
//! drills' reports stay in target/kernel-lab/run.
//!
//! Runs where QEMU and the kernel package are installed (scripts/packages.sh
//! installs both) and as root; says so and passes otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use musubi_tests::netns::skip_without_root;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The kernel the lab boots, when QEMU and Debian's kernel are here.
fn kernel() -> Option<PathBuf> {
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    let boot = std::fs::read_dir("/boot").ok()?;
    let vmlinuz = boot
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")));
    qemu.then_some(vmlinuz).flatten()
}

/// The datapath test (`--test`) or bench (`--bench`) binary, as cargo
/// built it for this run.
fn datapath_binary(kind: &str) -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args(["test", "--no-run", "--message-format=json", "-p", "musubi-tests", kind, "datapath"])
        .current_dir(repo(""))
        .output()
        .expect("cargo test --no-run");
    let text = String::from_utf8_lossy(&out.stdout);
    let exe = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .next_back();
    exe.unwrap_or_else(|| panic!("no datapath test binary: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The last `n` lines of a file that `keep` keeps.
fn tail(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn the_production_datapath_runs_in_a_real_kernel() {
    if skip_without_root() {
        return;
    }
    let Some(vmlinuz) = kernel() else {
        eprintln!("skipped: no qemu-system-x86_64 or no kernel in /boot (scripts/packages.sh installs both)");
        return;
    };
    let out = repo("target/kernel-lab/run");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("results directory");
    let mut env = format!("DATAPATH_TEST={}\n", datapath_binary("--test").display());
    if let Ok(steps) = std::env::var("KERNEL_LAB_STEPS") {
        if steps.contains("bench") || steps == "all" {
            env.push_str(&format!("DATAPATH_BENCH={}\n", datapath_binary("--bench").display()));
        }
        env.push_str(&format!("KERNEL_LAB_STEPS=\"{steps}\"\n"));
    }
    // The guest's other knobs (tests/kernel/guest), passed on when set here.
    for name in ["DRILLS", "DRILL_RATE", "TIME_SCALE", "GUEST_PROFILE", "MUSUBI_LOG"] {
        if let Ok(value) = std::env::var(name) {
            env.push_str(&format!("export {name}=\"{value}\"\n"));
        }
    }
    std::fs::write(out.join("env"), env).expect("env");
    let status = Command::new(repo("tests/kernel/boot"))
        .arg(repo("tests/kernel/guest"))
        .arg(&out)
        .status()
        .expect("tests/kernel/boot");
    let results = std::fs::read_to_string(out.join("results")).unwrap_or_default();
    eprintln!("kernel {}:\n{results}", vmlinuz.display());
    for drill in std::fs::read_dir(out.join("drills")).into_iter().flatten().flatten() {
        if drill.path().extension().is_some_and(|e| e == "md") {
            eprintln!("{}", std::fs::read_to_string(drill.path()).unwrap_or_default());
        }
    }
    let failed: Vec<&str> = results.lines().filter(|l| !l.contains(" ok ")).collect();
    // What a failed step said, and its lab's agents' last warnings: the run
    // directory stays on the machine that ran it, the test's output travels.
    for line in &failed {
        let step = line.split_whitespace().next().unwrap_or_default();
        eprintln!("──── {step}.log (last 40 lines)\n{}", tail(&out.join(format!("{step}.log")), 40, |_| true));
        for node in std::fs::read_dir(out.join(format!("{step}-lab"))).into_iter().flatten().flatten() {
            let log = node.path().join("agent.log");
            if log.exists() {
                let warnings = tail(&log, 8, |l| l.contains("WARN") || l.contains("ERROR"));
                eprintln!("──── {} agent warnings (last 8)\n{warnings}", node.file_name().to_string_lossy());
            }
        }
    }
    assert!(
        status.success() && failed.is_empty() && !results.is_empty(),
        "kernel lab failed ({status}): {failed:?}; logs in {}",
        out.display()
    );
}
