//! The `musubi` binary against the shipped topologies: valid ones pass,
//! every invalid one fails with its documented message at its documented
//! position, and compiled output matches the golden files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn musubi(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_musubi"))
        .args(["--color", "never"])
        .args(args)
        .current_dir(root())
        .output()
        .expect("run musubi")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn shipped_topologies_are_valid() {
    let out = musubi(&["validate", "topologies/minimal.yaml", "topologies/prefecture.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("topologies/prefecture.yaml: valid (4 tenants, 6 segments, 7 sites, 1 policy)"),
        "{stdout}"
    );
}

#[test]
fn every_invalid_example_fails_where_it_says() {
    let dir = root().join("topologies/invalid");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("invalid/").map(|e| e.expect("entry").path()).collect();
    files.sort();
    assert!(files.len() >= 15, "only {} invalid examples", files.len());
    for file in files {
        let body = std::fs::read_to_string(&file).expect("read");
        let expect = body
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let (pos, message) = expect.split_once(' ').expect("`# expect: LINE:COL message`");
        let rel = format!("topologies/invalid/{}", file.file_name().expect("name").to_string_lossy());
        let out = musubi(&["validate", &rel]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rel} should fail:\n{stderr}");
        assert!(stderr.contains(message), "{rel}: expected message {message:?}, got:\n{stderr}");
        let located = format!("{rel}:{pos}");
        let block = stderr.split("\nerror: ").find(|b| b.contains(message)).expect("message block");
        assert!(block.contains(&located), "{rel}: expected the error at {located}, got:\n{stderr}");
        assert!(block.contains('^'), "{rel}: no caret under the source line:\n{stderr}");
        assert!(stderr.contains("1 error found"), "{rel}: one mistake should give one error:\n{stderr}");
    }
}

#[test]
fn validation_reports_all_errors_at_once() {
    // One intent from two files, one mistake in each: both are reported.
    let dir = tempfile::tempdir().expect("tmp");
    let first = std::fs::read_to_string(root().join("topologies/invalid/unknown-field.yaml")).expect("read");
    std::fs::write(dir.path().join("a.yaml"), first).expect("write");
    let second = "kind: Site\nname: office-z\ntenant: city\nregion: west\n\
                  lines: [{name: wan, kind: mobile, priority: 1, address: 198.51.100.99}]\n\
                  attachments: [{segment: ofice, interface: eth1, prefixes: [10.10.9.0/24]}]\n";
    std::fs::write(dir.path().join("b.yaml"), second).expect("write");
    let out = musubi(&["validate", &dir.path().to_string_lossy()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("a.yaml:29:1"), "{stderr}");
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert!(stderr.contains("b.yaml:6:25"), "{stderr}");
    assert!(stderr.contains("segment `ofice` is not declared"), "{stderr}");
    assert!(stderr.contains("2 errors found"), "{stderr}");
}

#[test]
fn compiled_minimal_matches_golden_files() {
    let golden = root().join("topologies/expected/minimal");
    let bless = std::env::var_os("MUSUBI_BLESS").is_some();
    for site in ["ap-east", "ap-west", "office-a", "office-b"] {
        let out = musubi(&[
            "compile",
            "topologies/minimal.yaml",
            "--site",
            site,
            "--keys",
            "topologies/expected/minimal-keys.yaml",
            "--format",
            "yaml",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let header = format!(
            "# Produced by: musubi compile topologies/minimal.yaml --site {site} --keys topologies/expected/minimal-keys.yaml --format yaml\n"
        );
        let actual = header + &text(&out.stdout);
        // The intent's spellings, not protobuf's enum names.
        assert!(actual.contains("kind: dark-fiber") || actual.contains("kind: wide-area-ethernet"), "{actual}");
        assert!(!["LINE_KIND_", "ROLE_", "REGION_"].iter().any(|e| actual.contains(e)), "{actual}");
        let path = golden.join(format!("{site}.yaml"));
        if bless {
            std::fs::create_dir_all(&golden).expect("mkdir");
            std::fs::write(&path, &actual).expect("bless");
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("missing {} (run with MUSUBI_BLESS=1)", path.display()));
        assert_eq!(actual, expected, "{site} differs from {}", path.display());
    }
}

#[test]
fn compile_json_round_trips_through_protobuf_json() {
    let out = musubi(&["compile", "topologies/prefecture.yaml", "--site", "ap-east", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let config: musubi_proto::v1::SiteConfig = serde_json::from_slice(&out.stdout).expect("SiteConfig JSON");
    assert_eq!(config.site, "ap-east");
    assert_eq!(config.segments.len(), 6);
    let lgwan = config.segments.iter().find(|s| s.segment == "lgwan").expect("lgwan");
    assert_eq!(lgwan.policy.len(), 1, "the AP enforces the lgwan → mynumber policy");
    assert_eq!(lgwan.policy[0].to_segment, "mynumber");
}

#[test]
fn plan_against_itself_is_empty_and_a_change_names_its_sites() {
    let out = musubi(&[
        "plan",
        "topologies/prefecture.yaml",
        "--against",
        "topologies/prefecture.yaml",
        "--detailed-exitcode",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("No changes."), "{}", text(&out.stdout));

    let dir = tempfile::tempdir().expect("tmp");
    let changed = std::fs::read_to_string(root().join("topologies/prefecture.yaml"))
        .expect("read")
        .replace("address: 198.51.100.22}", "address: 198.51.100.99}");
    let new = dir.path().join("new.yaml");
    std::fs::write(&new, changed).expect("write");
    let out =
        musubi(&["plan", &new.to_string_lossy(), "--against", "topologies/prefecture.yaml", "--detailed-exitcode"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "changes give exit code 2: {}", text(&out.stderr));
    assert!(stdout.contains("address: 198.51.100.22 → 198.51.100.99"), "{stdout}");
    assert!(stdout.contains("Affected sites (3): ap-east, ap-west, kita-branch"), "{stdout}");
}

#[test]
fn allocations_file_keeps_numbers_stable_across_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let alloc = dir.path().join("alloc.json");
    let alloc_s = alloc.to_string_lossy().into_owned();
    let kita_hall = |intent: &str| -> musubi_proto::v1::SiteConfig {
        let out = musubi(&["compile", intent, "--site", "kita-hall", "--allocations", &alloc_s, "--format", "json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let before = kita_hall("topologies/prefecture.yaml");

    // Remove the alphabetically first segment: without the allocations file
    // every later table and port would shift down by one.
    let shrunk = std::fs::read_to_string(root().join("topologies/prefecture.yaml")).expect("read");
    let start = shrunk.find("kind: Segment\nname: juki").expect("juki");
    let end = start + shrunk[start..].find("---\n").expect("doc end") + 4;
    let shrunk = format!("{}{}", &shrunk[..start], &shrunk[end..])
        .replace("  - {segment: juki}\n", "")
        .lines()
        .filter(|l| !l.contains("{segment: juki,"))
        .collect::<Vec<_>>()
        .join("\n");
    let new = dir.path().join("shrunk.yaml");
    std::fs::write(&new, shrunk + "\n").expect("write");
    let after = kita_hall(&new.to_string_lossy());
    assert_eq!(after.segments.len(), before.segments.len() - 1);
    for seg in &after.segments {
        let old = before.segments.iter().find(|s| s.segment == seg.segment).expect("same segment");
        assert_eq!(seg.domain, old.domain, "{} kept its table", seg.segment);
        assert_eq!(seg.tunnels, old.tunnels, "{} kept its ports and addresses", seg.segment);
    }
}

/// A reader that stops early (`musubi … | head`) ends the command quietly:
/// exit 0, nothing on standard error, no panic about a broken pipe.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    for args in [&["generate", "--sites", "2000"][..], &["verify", "topologies/prefecture.yaml"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_musubi"))
            .args(["--color", "never"])
            .args(args)
            .current_dir(root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run musubi");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("first line");
        // The reader is gone: the rest of the output meets a closed pipe.
        assert!(!first.is_empty(), "{args:?}: no output");
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        child.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("stderr");
        assert!(status.success(), "{args:?}: {status}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: said on a closed pipe: {stderr}");
    }
}

#[test]
fn completion_scripts_and_manual_pages_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = musubi(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["apply", "validate", "drill", "allow-destroy-all"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let out = musubi(&["man", &dir.path().to_string_lossy()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for page in ["musubi.1", "musubi-apply.1", "musubi-lab-drill.1", "musubi-token-create.1"] {
        let man = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(man.contains(".TH") && man.contains("Example"), "{page}: {man}");
    }
    assert!(text(&out.stdout).contains("manual pages in"), "{}", text(&out.stdout));
}
