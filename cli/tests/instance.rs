//! `vmr instance ...` and the agent side of `vmr snapshot ...` against a
//! real `capture-agent serve` with a real Tansu broker and registry: a
//! QEMU/TCG instance of demo-linux launched, listed, shown, watched to its
//! boot, paused, resumed, sent a PUT and stopped, all through `vmr`, with
//! exit codes and `--json` checked; and the main errors (no such instance,
//! no such image, a duplicate id, a wrong state, bad flags).
//!
//! Heavy: needs root (network namespaces, TAP), qemu-system-x86_64, the
//! demo-linux image (guest/linux/build.sh), the Tansu broker
//! (scripts/setup.sh) and the `capture-agent`, `schema-registry`,
//! `vhost-tap-blk` and `vhost-tap-net` binaries (`cargo build --workspace
//! --bins`); without them the test fails and names what is missing.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vmr_env;
use vmr_testkit::broker::Broker;
use vmr_testkit::qemu::NetNs;
use vmr_testkit::registry::Registry;
use vmr_testkit::{free_port, workspace_bin, ChildGuard};

const T: Duration = Duration::from_secs(180);

fn demo_linux() -> PathBuf {
    let dir = vmr_testkit::cache_dir().join("demo-linux");
    assert!(
        dir.join("image.toml").is_file(),
        "the demo-linux image ({}/image.toml) is missing: build it with guest/linux/build.sh",
        dir.display()
    );
    std::fs::canonicalize(&dir).expect("the image directory resolves")
}

#[test]
fn instance_lifecycle_through_the_cli() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (network namespaces, TAP)");
    let image = demo_linux();
    let agent_bin = workspace_bin("capture-agent").unwrap_or_else(|e| panic!("{e}"));
    for b in ["vhost-tap-blk", "vhost-tap-net"] {
        workspace_bin(b).unwrap_or_else(|e| panic!("{e}"));
    }
    let broker = Broker::start().unwrap_or_else(|e| panic!("starting the broker: {e}"));
    let registry = Registry::start(&broker.bootstrap())
        .unwrap_or_else(|e| panic!("starting the registry: {e}"));
    // The agent's shippers frame events with the registered schema ids.
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async {
            schema_registry::client::RegistryClient::new(&registry.url())
                .unwrap()
                .register_vmr_schemas()
                .await
        })
        .expect("registering the schemas");
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    let grpc = format!("127.0.0.1:{}", free_port());
    let cfg = dir.join("agent.toml");
    let store = format!("file://{}", dir.join("store").display());
    std::fs::write(
        &cfg,
        format!(
            "[endpoints]\nbootstrap-servers = \"{}\"\nregistry-url = \"{}\"\nevent-partitions = 4\n\n\
             [agent]\nlisten = \"{grpc}\"\nmetrics-listen = \"127.0.0.1:{}\"\ndata-dir = \"{}\"\n\
             image-dirs = [\"{}\"]\nstop-grace-secs = 5\ndrain-timeout-secs = 20\n\n\
             [snapshots]\nstore-url = \"{store}\"\n",
            broker.bootstrap(),
            registry.url(),
            free_port(),
            dir.join("data").display(),
            image.parent().unwrap().display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut agent = ChildGuard::spawn(
        "capture-agent serve",
        Command::new(&agent_bin)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let start = Instant::now();
    while std::net::TcpStream::connect(&grpc).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent never listened on {grpc}: {}",
            std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ns = NetNs::create().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://{grpc}");
    let data = dir.join("cli");
    let e = [
        ("VMR_AGENT_URL", url.as_str()),
        ("VMR_BOOTSTRAP_SERVERS", &broker.bootstrap()),
        ("VMR_DATA_DIR", data.to_str().unwrap()),
        ("VMR_OBJECT_STORE_URL", store.as_str()),
    ];
    let e: Vec<(&str, &str)> = e.to_vec();

    let r = vmr_env(&["--json", "instance", "list"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json(), serde_json::json!({ "instances": [] }));

    // Errors before any instance exists.
    let r = vmr_env(&["instance", "show", "cli-none"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("error: the capture agent refused"),
        "{r:?}"
    );
    let r = vmr_env(&["--json", "instance", "stop", "cli-none"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
    let j: serde_json::Value = serde_json::from_str(r.stderr.lines().last().unwrap()).unwrap();
    assert_eq!(j["error"]["kind"], "not_found");
    let r = vmr_env(
        &["instance", "launch", "no-such-image", "--accel", "tcg"],
        &e,
        T,
    );
    assert!(
        r.code == 3 || r.code == 2,
        "an unknown image is not found or invalid: {r:?}"
    );
    assert!(r.stderr.contains("no-such-image"), "{r:?}");
    for args in [
        vec!["instance", "launch", "demo-linux", "--accel", "warp"],
        vec!["instance", "launch", "demo-linux", "--id", "bad id!"],
        vec!["instance", "show", "a/b"],
        vec!["instance", "list", "--no-such-flag"],
        vec!["instance", "watch", "x", "--timeout", "-1"],
    ] {
        let r = vmr_env(&args, &e, T);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }

    // Launch, list, show.
    let id = "cli-inst-1";
    let r = vmr_env(
        &[
            "--json",
            "instance",
            "launch",
            "demo-linux",
            "--id",
            id,
            "--accel",
            "tcg",
            "--netns",
            ns.name(),
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["instance_id"], id);
    assert_eq!(j["image"], "demo-linux");
    assert_eq!(j["driver"], "qemu");
    assert!(j["state"] == "running" || j["state"] == "starting", "{j}");
    let r = vmr_env(
        &[
            "instance",
            "launch",
            "demo-linux",
            "--id",
            id,
            "--accel",
            "tcg",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 5, "a duplicate id is a failed precondition: {r:?}");
    let r = vmr_env(&["instance", "list"], &e, T);
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with(id) && l.contains("demo-linux")),
        "{r:?}"
    );
    let r = vmr_env(&["--json", "instance", "show", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let names: Vec<String> = r.json()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"vda".to_string()) && names.contains(&"net0".to_string()),
        "{names:?}"
    );

    // Its boot, as the agent's watch stream reports it.
    let r = vmr_env(
        &[
            "--json",
            "instance",
            "watch",
            id,
            "--until",
            "boot",
            "--timeout",
            "120",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let lines = r.json_lines();
    assert!(
        lines
            .iter()
            .any(|l| l["kind"] == "boot" && l["instance_id"] == id),
        "{lines:?}"
    );

    // Pause, a second pause (wrong state), resume.
    let r = vmr_env(&["--json", "instance", "pause", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "paused");
    let r = vmr_env(&["instance", "pause", id], &e, T);
    assert_eq!(r.code, 5, "pausing a paused instance: {r:?}");
    let r = vmr_env(&["--json", "instance", "resume", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "running");

    // A snapshot through the agent's snapshot engine: taken, listed by the
    // agent, pinned.
    let r = vmr_env(&["--json", "snapshot", "take", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["state"], "succeeded", "{r:?}");
    let snap = j["snapshot"]["snapshot_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshot id in {j}"))
        .to_string();
    let r = vmr_env(&["--json", "snapshot", "list", "--agent", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&snap), "the agent lists {snap}: {r:?}");
    assert_eq!(j["instance_id"], id, "{j}");
    assert_eq!(j["done"], true, "{j}");
    assert_eq!(j["snapshot"]["instance"], id, "{j}");
    assert_eq!(j["snapshot"]["driver"], "qemu", "{j}");
    assert!(j["snapshot"]["objects"].as_u64() > Some(0), "{j}");
    let r = vmr_env(&["--json", "snapshot", "list", "--agent", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&snap), "the agent lists {snap}: {r:?}");
    let j = r.json();
    assert_eq!(j["source"], url.as_str(), "{j}");
    let listed = |j: &serde_json::Value| -> Option<serde_json::Value> {
        j["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["snapshot_id"] == snap.as_str())
            .cloned()
    };
    assert_eq!(listed(&j).unwrap()["pinned"], false, "{j}");
    let r = vmr_env(&["--json", "snapshot", "pin", id, &snap], &e, T);
    assert_eq!(r.code, 0, "pinning {snap}: {r:?}");
    assert_eq!(r.json()["pinned"], true, "{r:?}");
    assert_eq!(r.json()["snapshot_id"], snap.as_str(), "{r:?}");
    let r = vmr_env(&["--json", "snapshot", "list", "--agent", id], &e, T);
    assert_eq!(listed(&r.json()).unwrap()["pinned"], true, "{r:?}");
    let r = vmr_env(&["snapshot", "pin", id, &snap, "--unpin"], &e, T);
    assert_eq!(r.code, 0, "unpinning {snap}: {r:?}");
    assert!(r.stdout.contains("is not pinned"), "{r:?}");
    // The same snapshot read from the store, with no agent involved.
    let r = vmr_env(&["--json", "snapshot", "list", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["source"], store.as_str(), "{j}");
    assert_eq!(
        listed(&j).unwrap()["pinned"],
        serde_json::Value::Null,
        "{j}"
    );
    let r = vmr_env(&["--json", "snapshot", "show", id, &snap], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["snapshot_id"], snap.as_str(), "{j}");
    assert_eq!(j["manifest"]["instance"], id, "{j}");
    assert_eq!(j["manifest"]["image"], "demo-linux", "{j}");
    let r = vmr_env(&["snapshot", "show", id, "latest"], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout
            .lines()
            .any(|l| l.starts_with("snapshot") && l.contains(&snap)),
        "{r:?}"
    );
    // Deleted through the agent: gone from its list and from the store;
    // deleting or showing it again is not found.
    let r = vmr_env(&["--json", "snapshot", "delete", id, &snap], &e, T);
    assert_eq!(r.code, 0, "deleting {snap}: {r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({ "deleted": { "instance": id, "snapshot_id": snap } })
    );
    let r = vmr_env(&["--json", "snapshot", "list", "--agent", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(listed(&r.json()).is_none(), "{r:?}");
    let r = vmr_env(&["--json", "snapshot", "list", id], &e, T);
    assert!(listed(&r.json()).is_none(), "{r:?}");
    let r = vmr_env(&["snapshot", "delete", id, &snap], &e, T);
    assert_eq!(r.code, 3, "deleting {snap} twice: {r:?}");
    let r = vmr_env(&["snapshot", "show", id, &snap], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
    let r = vmr_env(&["snapshot", "pin", "cli-none", "0001"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
    let r = vmr_env(&["snapshot", "take", "cli-none"], &e, T);
    assert_eq!(r.code, 3, "{r:?}");
    for args in [
        vec!["snapshot", "take", id, "--timeout", "0"],
        vec!["snapshot", "delete", "a/b", "0001"],
        vec!["snapshot", "pin", id],
    ] {
        let r = vmr_env(&args, &e, T);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
    }

    // Stop; stopping again returns it unchanged.
    let r = vmr_env(&["--json", "instance", "stop", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "stopped");
    let r = vmr_env(&["--json", "instance", "stop", id], &e, T);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "stopped");
    let r = vmr_env(&["instance", "resume", id], &e, T);
    assert_eq!(r.code, 5, "resuming a stopped instance: {r:?}");
    // The recording reached the broker.
    let r = vmr_env(
        &[
            "--json",
            "events",
            "tail",
            "--instance",
            id,
            "--kind",
            "lifecycle",
        ],
        &e,
        T,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let kinds: Vec<String> = r
        .json_lines()
        .iter()
        .map(|l| l["lifecycle"]["kind"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(kinds.iter().any(|k| k == "boot"), "{kinds:?}");
    agent.stop(Duration::from_secs(30));
}
