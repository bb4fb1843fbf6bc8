//! End to end across the binaries: a generated intent is validated and
//! compiled by the controller into per-site files, and every file is read
//! back by the agent.

use std::path::PathBuf;
use std::process::{Command, Output};

use musubi_proto::v1::SiteConfig;
use musubi_tests::bin;
use prost::Message;

fn run(name: &str, args: &[&str]) -> Output {
    let out = Command::new(bin(name)).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn generated_intent_compiles_for_every_site_and_agents_read_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let intent = dir.path().join("national.yaml");
    let out_a = dir.path().join("a");
    let out_b = dir.path().join("b");
    let alloc = dir.path().join("alloc.json");
    let (intent_s, alloc_s) = (intent.to_string_lossy().into_owned(), alloc.to_string_lossy().into_owned());

    run("musubi", &["generate", "--sites", "2500", "--segments", "3", "-o", &intent_s]);
    let v = run("musubi", &["validate", &intent_s]);
    assert!(String::from_utf8_lossy(&v.stdout).contains("2,504 sites"), "two groups, each with two access points");

    run("musubi-controller", &["compile-all", &intent_s, "--out", &out_a.to_string_lossy(), "--allocations", &alloc_s]);
    run("musubi-controller", &["compile-all", &intent_s, "--out", &out_b.to_string_lossy(), "--allocations", &alloc_s]);

    let pb_files: Vec<PathBuf> = std::fs::read_dir(&out_a)
        .expect("out")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pb"))
        .collect();
    assert_eq!(pb_files.len(), 2504);
    for pb in &pb_files {
        let name = pb.file_name().expect("name");
        let a = std::fs::read(pb).expect("read");
        let b = std::fs::read(out_b.join(name)).expect("read");
        assert_eq!(a, b, "{name:?}: a second run must produce identical bytes");
        let decoded = SiteConfig::decode(a.as_slice()).expect("protobuf");
        let json: SiteConfig =
            serde_json::from_slice(&std::fs::read(pb.with_extension("json")).expect("json")).expect("parse json");
        assert_eq!(decoded, json, "{name:?}: JSON and protobuf carry the same config");
    }

    let ap = run("musubi-agent", &["inspect", &out_a.join("ap-east-0.pb").to_string_lossy()]);
    let ap = String::from_utf8_lossy(&ap.stdout);
    // 2,000 member sites plus the interconnect peer, in each of 3 segments.
    assert_eq!(ap.matches("2001 peers").count(), 3, "{ap}");
    let site = run("musubi-agent", &["inspect", &out_a.join("site-1-7.json").to_string_lossy()]);
    let site = String::from_utf8_lossy(&site.stdout);
    assert!(site.contains("site site-1-7 (tenant pref-1"), "{site}");
    assert_eq!(site.matches("2 peers").count(), 3, "a site peers with its two access points per segment:\n{site}");
}
