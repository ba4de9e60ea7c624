//! The service configuration: the example file parses, references are
//! checked, unknown keys are refused, and `replayer --check-config` says so.

use std::process::Command;

use replayer::service::Config;

fn example() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/replayer.example.toml"
    );
    std::fs::read_to_string(path).expect("the example configuration exists")
}

#[test]
fn the_example_parses_and_maps_tokens_to_tenants() {
    let c = Config::parse(&example()).expect("the example is valid");
    let shop = c
        .tenant_of("change-me-shop-token-0001")
        .expect("a known token");
    assert_eq!(shop.name, "shop");
    assert!(shop.allows("shop-42") && !shop.allows("db-1") && !shop.allows("shop"));
    let ops = c
        .tenant_of("change-me-ops-token-00002")
        .expect("a known token");
    assert!(ops.allows("db-2") && !ops.allows("db-3"));
    assert!(c.tenant_of("change-me-shop-token-000").is_none());
    assert!(c.tenant_of("").is_none());
}

#[test]
fn bad_configurations_are_refused_with_the_cause() {
    let base = example();
    let cases = [
        (
            base.replace("max_clones = 8", "max_clones = 8\nbogus = 1"),
            "bogus",
        ),
        (
            base.replace("tenant = \"ops\"", "tenant = \"nobody\""),
            "not configured",
        ),
        (
            base.replace("change-me-ops-token-00002", "short"),
            "shorter than 16",
        ),
        (
            base.replace("change-me-ops-token-00002", "change-me-shop-token-0001"),
            "two tokens",
        ),
        (
            base.replace("instances = [\"db-1\", \"db-2\"]", ""),
            "neither instances",
        ),
        (base.replace("52:54:00:12:34:56", "52:54:00"), "MAC address"),
        (
            base.replace("memory_mib = 32", "memory_mib = 0"),
            "memory_mib",
        ),
        (
            base.replace(
                "bootstrap_servers = \"127.0.0.1:9092\"",
                "bootstrap_servers = \" \"",
            ),
            "bootstrap_servers",
        ),
    ];
    for (text, want) in cases {
        let e = Config::parse(&text).expect_err(want).to_string();
        assert!(e.contains(want), "{want:?} not in {e:?}");
    }
}

#[test]
fn check_config_reports_valid_and_invalid_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, example()).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_replayer"))
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()
        .expect("run replayer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "work_dir = 3").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_replayer"))
        .arg("--config")
        .arg(&bad)
        .arg("--check-config")
        .output()
        .expect("run replayer");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.toml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_replayer"))
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("run replayer");
    assert!(!out.status.success());
}
