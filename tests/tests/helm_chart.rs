//! The Helm chart (`helm/vmreplay`) rendered with the Helm engine and checked
//! against the Kubernetes API schemas and the real binaries' configuration
//! checks, by `helm/tests/test_chart.py`.
//!
//! The value sets cover PLAINTEXT, SSL with a client certificate,
//! SASL_PLAINTEXT and SASL_SSL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512): each
//! binary's `--check-config` must accept its rendered config with the pod's
//! Secrets in place, and refuse it, naming the file, when the CA file is gone.
//!
//! Needs `python3` with the packages of `helm/tests/requirements.txt`
//! (`scripts/setup.sh` installs them) and the workspace's binaries
//! (`cargo build --workspace --bins`); a missing one fails the test by name.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use vmr_testkit::process::workspace_bin;

#[test]
fn chart_renders_validates_and_matches_the_binaries() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit lives in the workspace root")
        .to_path_buf();
    let mut bin_dir = None;
    for name in ["capture-agent", "replayer", "schema-registry"] {
        let path = workspace_bin(name).unwrap_or_else(|e| panic!("{e}"));
        bin_dir = path.parent().map(PathBuf::from);
    }
    let bin_dir = bin_dir.expect("three binaries were found");

    let probe = Command::new("python3")
        .args(["-c", "import helm_python, kubernetes_validate, yaml"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is missing ({e}); install it: apt-get install python3")
        });
    assert!(
        probe.status.success(),
        "the chart test's Python packages are missing; install them: \
         python3 -m pip install -r helm/tests/requirements.txt\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );

    let script = root.join("helm/tests/test_chart.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    std::thread::spawn(move || {
        let read = |mut r: Box<dyn std::io::Read>| {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        };
        let err = std::thread::spawn(move || read(Box::new(stderr)));
        let out = read(Box::new(stdout));
        let _ = tx.send((out, err.join().unwrap_or_default()));
    });
    let Ok((out, err)) = rx.recv_timeout(Duration::from_secs(300)) else {
        // SAFETY: `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = child.wait();
        panic!("{} did not finish within 300 s", script.display());
    };
    let status = child.wait().expect("the child was started");
    println!("{out}");
    eprintln!("{err}");
    assert!(
        status.success(),
        "{} failed ({status}):\n{}",
        script.display(),
        // The summary after the last "failure(s)" line, or a missing-tool line.
        out.rsplit("failure(s)").next().unwrap_or(&out)
    );
    let oks = out.lines().filter(|l| l.starts_with("ok ")).count();
    assert!(oks > 300, "only {oks} checks ran:\n{out}");
    assert!(out.contains("== 0 failure(s)"), "no summary line:\n{out}");
    // Every binary's real check ran on the rendered config, and refused it
    // once the Secret-mounted CA file was gone.
    for what in [
        "agent config",
        "vmr config",
        "replayer config",
        "registry config",
    ] {
        for case in [
            ": ",
            " without the CA file: refused",
            " without the SASL user name: refused",
        ] {
            let line = format!("{what}{case}");
            assert!(
                out.lines()
                    .any(|l| l.starts_with("ok ") && l.contains(&line)),
                "no passing check \"{line}\":\n{out}"
            );
        }
    }
    for set in ["default", "external-registry", "netpol-servicemonitor"] {
        assert!(
            out.contains(&format!("ok   {set}: helm lint --strict")),
            "helm lint did not pass for {set}:\n{out}"
        );
    }
    println!("{oks} chart checks passed");
}
