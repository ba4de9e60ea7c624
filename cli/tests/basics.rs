//! `vmr` usage errors, completions and machine images, through the real
//! binary. The image tests read the built demo image
//! (`~/.cache/vmreplay/demo-linux`, made by guest/linux/build.sh through
//! scripts/setup.sh); without it they fail and say so.

mod common;

use common::{vmr, vmr_env};
use std::time::Duration;

#[test]
fn bad_flag_is_a_usage_error() {
    let d = tempfile::tempdir().unwrap();
    let r = vmr(&["--no-such-flag", "doctor"], d.path());
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("--no-such-flag"), "{}", r.stderr);
    let r = vmr(&["events", "tail", "--seq", "9..3"], d.path());
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("empty range"), "{}", r.stderr);
}

#[test]
fn bad_config_file_is_a_usage_error_naming_the_key() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("vmr.toml");
    std::fs::write(&cfg, "[endpoints]\nbootstrap-server = \"x:1\"\n").unwrap();
    let r = vmr(
        &["--config", cfg.to_str().unwrap(), "image", "list"],
        d.path(),
    );
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("bootstrap-server"), "{}", r.stderr);
    assert!(r.stderr.contains("hint:"), "{}", r.stderr);
}

/// Every leaf subcommand of `vmr` (from its clap definition, as `vmr
/// --help` lists them), each with the test binary that runs its happy path
/// against real processes.
const COVERED: &[(&str, &str)] = &[
    ("doctor", "services"),
    ("image list", "basics"),
    ("image show", "basics"),
    ("image build", "basics"),
    ("events tail", "services"),
    ("stack up", "services"),
    ("stack down", "services"),
    ("stack status", "services"),
    ("stack env", "services"),
    ("replay start", "replay"),
    ("replay watch", "replay"),
    ("replay pause", "replay"),
    ("replay resume", "replay"),
    ("replay step", "replay"),
    ("replay run-to", "replay"),
    ("replay speed", "replay"),
    ("replay stop", "replay"),
    ("replay delete", "replay"),
    ("replay list", "replay"),
    ("replay show", "replay"),
    ("replay report", "replay"),
    ("replay debug", "replay"),
    ("instance launch", "instance"),
    ("instance list", "instance"),
    ("instance show", "instance"),
    ("instance pause", "instance"),
    ("instance resume", "instance"),
    ("instance stop", "instance"),
    ("instance watch", "instance"),
    ("snapshot list", "instance"),
    ("snapshot show", "instance"),
    ("snapshot take", "instance"),
    ("snapshot pin", "instance"),
    ("snapshot delete", "instance"),
    ("timeline", "replay"),
    ("completions", "basics"),
];

fn leaves(c: &clap::Command, prefix: &str, out: &mut Vec<String>) {
    let subs: Vec<_> = c
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .collect();
    if subs.is_empty() {
        out.push(prefix.trim().to_string());
    }
    for s in subs {
        leaves(s, &format!("{prefix} {}", s.get_name()), out);
    }
}

#[test]
fn every_subcommand_has_a_test_that_runs_it() {
    use clap::CommandFactory;
    let mut all = Vec::new();
    leaves(&vmr::Cli::command(), "", &mut all);
    let listed: Vec<String> = COVERED.iter().map(|(c, _)| c.to_string()).collect();
    let mut sorted = all.clone();
    sorted.sort();
    let mut l = listed.clone();
    l.sort();
    assert_eq!(
        sorted, l,
        "a subcommand was added or removed: list it in COVERED"
    );
    let sources = [
        ("basics", include_str!("basics.rs")),
        ("services", include_str!("services.rs")),
        ("replay", include_str!("replay.rs")),
        ("instance", include_str!("instance.rs")),
    ];
    for (cmd, test) in COVERED {
        let src = sources.iter().find(|(n, _)| n == test).unwrap().1;
        let flat: String = src.chars().filter(|c| !c.is_whitespace()).collect();
        let words: Vec<String> = cmd.split(' ').map(|w| format!("\"{w}\"")).collect();
        assert!(
            flat.contains(&words.join(",")),
            "tests/{test}.rs never runs `vmr {cmd}`"
        );
    }
}

#[test]
fn completions_are_printed() {
    let d = tempfile::tempdir().unwrap();
    let r = vmr(&["completions", "bash"], d.path());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains("_vmr"),
        "{}",
        &r.stdout[..r.stdout.len().min(400)]
    );
    for sub in ["doctor", "image", "events", "stack"] {
        assert!(r.stdout.contains(sub), "completion lacks {sub}");
    }
    for (shell, mark) in [("zsh", "#compdef vmr"), ("fish", "complete -c vmr")] {
        let r = vmr(&["completions", shell], d.path());
        assert_eq!(r.code, 0, "{r:?}");
        assert!(
            r.stdout.contains(mark),
            "{shell}: {}",
            &r.stdout[..r.stdout.len().min(400)]
        );
        assert!(
            r.stdout.contains("run-to"),
            "{shell} completion lacks run-to"
        );
    }
    let r = vmr(&["completions", "tcsh"], d.path());
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("tcsh"), "{r:?}");
}

fn demo_image() -> std::path::PathBuf {
    let dir = vmr_testkit::cache_dir().join("demo-linux");
    assert!(
        dir.join("image.toml").is_file(),
        "the demo image is missing at {} (build it: guest/linux/build.sh)",
        dir.display()
    );
    dir
}

#[test]
fn image_list_and_show_on_the_built_demo_image() {
    let demo = demo_image();
    let d = tempfile::tempdir().unwrap();
    let r = vmr(&["--json", "image", "list"], d.path());
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let images = v["images"].as_array().unwrap();
    let hit = images
        .iter()
        .find(|i| i["name"] == "demo-linux")
        .unwrap_or_else(|| panic!("demo-linux not listed: {v}"));
    assert_eq!(hit["valid"], true);
    assert_eq!(hit["drivers"], serde_json::json!(["qemu"]));
    // One row per image even though the cache reaches it by several names.
    let canon = std::fs::canonicalize(&demo).unwrap();
    let rows = images
        .iter()
        .filter(|i| {
            std::fs::canonicalize(i["dir"].as_str().unwrap())
                .ok()
                .as_ref()
                == Some(&canon)
        })
        .count();
    assert_eq!(rows, 1, "{v}");

    let r = vmr(&["image", "list"], d.path());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.starts_with("NAME"), "{}", r.stdout);
    assert!(r.stdout.contains("demo-linux"), "{}", r.stdout);

    let r = vmr(&["--json", "image", "show", "demo-linux"], d.path());
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "demo-linux");
    assert!(v["memory_mib"].as_u64().unwrap() > 0);
    assert!(std::path::Path::new(v["kernel"].as_str().unwrap()).is_file());
    assert_eq!(v["nics"][0]["name"], "net0");
    assert_eq!(v["service"]["protocol"], "vmr-kv-1");

    let r = vmr(&["image", "show", demo.to_str().unwrap()], d.path());
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("nic net0"), "{}", r.stdout);
}

#[test]
fn malformed_image_names_the_field_and_exits_5() {
    let demo = demo_image();
    let root = tempfile::tempdir().unwrap();
    let bad = root.path().join("bad-mac");
    std::fs::create_dir(&bad).unwrap();
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        std::fs::copy(demo.join(f), bad.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(demo.join("image.toml")).unwrap();
    let broken = text.replace("name = \"demo-linux\"", "name = \"bad-mac\"");
    let mac_line = broken
        .lines()
        .find(|l| l.starts_with("mac = "))
        .expect("the demo image has a NIC MAC")
        .to_string();
    std::fs::write(
        bad.join("image.toml"),
        broken.replace(&mac_line, "mac = \"52:54\""),
    )
    .unwrap();

    let d = tempfile::tempdir().unwrap();
    let dd = d.path().to_str().unwrap();
    let r = vmr(&["image", "show", bad.to_str().unwrap()], d.path());
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("nics[0].mac"), "{}", r.stderr);
    assert!(r.stderr.contains("hint: fix `nics[0].mac`"), "{}", r.stderr);

    // Listed through the image path as invalid, with the field.
    let ip = root.path().to_str().unwrap();
    let env = [("VMR_DATA_DIR", dd), ("VMR_IMAGE_PATH", ip)];
    let r = vmr_env(&["--json", "image", "list"], &env, Duration::from_secs(30));
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    let row = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["dir"].as_str().unwrap().ends_with("bad-mac"))
        .unwrap_or_else(|| panic!("bad-mac not listed: {v}"));
    assert_eq!(row["valid"], false);
    assert_eq!(row["error"]["field"], "nics[0].mac");

    // --json errors are one object on stderr.
    let r = vmr_env(
        &["--json", "image", "show", bad.to_str().unwrap()],
        &env,
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 5);
    let e: serde_json::Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(e["error"]["kind"], "failed_precondition");
    assert_eq!(e["error"]["exit_code"], 5);
}

#[test]
fn unknown_image_is_not_found() {
    let d = tempfile::tempdir().unwrap();
    let r = vmr(&["image", "show", "no-such-image"], d.path());
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("no image named \"no-such-image\""),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("vmr image list"), "{}", r.stderr);
}

#[test]
fn image_build_reuses_the_cached_build_and_reports_progress() {
    let demo = demo_image();
    let d = tempfile::tempdir().unwrap();
    let r = vmr_env(
        &["--json", "image", "build"],
        &[("VMR_DATA_DIR", d.path().to_str().unwrap())],
        Duration::from_secs(600),
    );
    assert_eq!(r.code, 0, "{r:?}");
    let v = r.json();
    assert_eq!(v["name"], "demo-linux");
    assert_eq!(
        std::fs::canonicalize(v["dir"].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&demo).unwrap()
    );
    assert!(v["build_seconds"].as_f64().unwrap() >= 0.0);
    assert!(r.stderr.contains("step 1: [guest-linux]"), "{}", r.stderr);

    // Outside a checkout the build script is missing: exit 5, what to do.
    let r = vmr_env(
        &["image", "build"],
        &[
            ("VMR_DATA_DIR", d.path().to_str().unwrap()),
            ("VMR_ROOT", d.path().to_str().unwrap()),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr.contains("guest/linux/build.sh does not exist"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("set VMR_ROOT"), "{}", r.stderr);
}

#[test]
fn snapshot_list_without_a_store_uses_the_local_stack_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let run = vmr_env(
        &["--json", "snapshot", "list", "vm-none"],
        &[("VMR_DATA_DIR", d)],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    let j = run.json();
    assert_eq!(j["snapshots"], serde_json::json!([]));
    assert_eq!(j["source"], format!("file://{d}/stack/objects"));
    // A configured store is used as it is.
    let other = format!("file://{d}/elsewhere");
    let run = vmr_env(
        &["--json", "snapshot", "list", "vm-none"],
        &[("VMR_DATA_DIR", d), ("VMR_OBJECT_STORE_URL", &other)],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.json()["source"], other);
    let run = vmr_env(
        &["snapshot", "show", "vm-none", "0001"],
        &[("VMR_DATA_DIR", d)],
        Duration::from_secs(60),
    );
    assert_eq!(run.code, 3, "{run:?}");
    assert!(
        run.stderr.contains("hint: list the instance's snapshots"),
        "{run:?}"
    );
}
