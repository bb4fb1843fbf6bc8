//! `musubi lab status`: the lab's nodes and processes, then `musubi status`.

use musubi_process::println;
use std::path::Path;

use anyhow::Result;

use crate::lab::Lab;

pub(crate) fn status(lab: &Lab) -> Result<()> {
    let clab = lab.topology()?;
    println!("lab {} ({})", lab.name, lab.dir.display());
    let namespaces = crate::netns::list();
    // Columns as wide as the longest node name (the prefecture lab's hosts
    // are `<site>-<segment>`).
    let width = clab.topology.nodes.keys().map(|n| n.chars().count()).max().unwrap_or(0).max(4);
    for (name, node) in &clab.topology.nodes {
        let up = namespaces.contains(&lab.ns(name));
        let pids: Vec<String> = std::fs::read_dir(lab.dir.join("pids"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.")))
                    .filter_map(|e| {
                        let what = e.file_name().to_string_lossy().split_once('.').map(|(_, w)| w.to_string())?;
                        let pid = std::fs::read_to_string(e.path()).ok()?;
                        let alive = Path::new(&format!("/proc/{}", pid.trim())).exists();
                        Some(format!("{what} {}", if alive { "running" } else { "stopped" }))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let state = if up { "up" } else { "missing" };
        let line = format!("  {name:<width$}  {:<10} {state:<8} {}", node.role(), pids.join(", "));
        println!("{}", line.trim_end());
    }
    if let Ok((controller, _)) = clab.controller() {
        println!();
        let _ = lab.musubi(controller).arg("status").status();
    }
    Ok(())
}
