//! `musubi lab down`: everything of a lab goes, whatever state `up` left.

use musubi_core::words::count;
use musubi_process::println;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::lab::Lab;

/// Everything of the lab goes, whatever state `up` left it in.
pub(crate) fn down(lab: &Lab) -> Result<()> {
    // Recorded processes: asked to stop, then killed.
    let pids: Vec<String> = std::fs::read_dir(lab.dir.join("pids"))
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect())
        .unwrap_or_default();
    for pid in &pids {
        let _ = Command::new("kill").arg(pid.trim()).stderr(Stdio::null()).status();
        // A drill's stopped node is frozen: it hears the request once it runs.
        let _ = Command::new("kill").args(["-CONT", pid.trim()]).stderr(Stdio::null()).status();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| Path::new(&format!("/proc/{}", p.trim())).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Namespaces by name: whatever is left in them (wireguard-go) first.
    let prefix = lab.ns("");
    let mut removed = 0;
    for ns in crate::netns::list().into_iter().filter(|n| n.starts_with(&prefix)) {
        crate::netns::remove(&ns)?;
        removed += 1;
    }
    if let Ok(entries) = std::fs::read_dir(lab.dir.join("mnt")) {
        for e in entries.filter_map(|e| e.ok()) {
            crate::netns::unmount(&e.path());
        }
    }
    crate::netns::unmount(&lab.dir.join("mnt"));
    if lab.dir.exists() {
        std::fs::remove_dir_all(&lab.dir).with_context(|| format!("removing {}", lab.dir.display()))?;
    }
    println!("lab {} down: {} and {} removed", lab.name, count(removed, "namespace"), count(pids.len(), "process"));
    Ok(())
}
