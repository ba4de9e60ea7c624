//! Snapshots as QEMU migration streams in a file.
//!
//! QEMU 8.2 and later migrate straight to and from a file (`file:` URIs);
//! older versions get the stream through a shell command (`exec:`). The
//! outgoing command writes to `<file>.partial` and renames it into place
//! once `cat` has written everything, so the file exists under its final
//! name only when `cat` succeeded. When `cat` or the rename fails (a full
//! disk), the command removes the partial file and leaves `<name>.failed`
//! holding the error in a scratch directory (the instance's work directory,
//! so the error text is not lost to the same full disk), and the driver can
//! tell a failed write from a slow one. QEMU reports such a migration `completed` (it does not see the
//! command's status) or `failed` (once the pipe breaks); the driver cleans
//! up after both.

use std::path::{Path, PathBuf};

use super::qmp::QemuVersion;

/// The first QEMU version with `file:` migration URIs.
pub const FILE_URI_SINCE: QemuVersion = QemuVersion {
    major: 8,
    minor: 2,
    micro: 0,
};

/// Where an outgoing migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The `migrate` URI.
    pub uri: String,
    /// Whether the file appears under its final name only after QEMU reports
    /// completion (the `exec:` path renames it into place).
    pub renamed_after: bool,
}

fn supports_file_uri(version: Option<QemuVersion>) -> bool {
    version.is_some_and(|v| v >= FILE_URI_SINCE)
}

/// A string quoted for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The migration URI that writes the stream to `target`; an `exec:` write
/// keeps its error text in `scratch`.
pub fn outgoing(version: Option<QemuVersion>, target: &Path, scratch: &Path) -> Outgoing {
    if supports_file_uri(version) {
        return Outgoing {
            uri: format!("file:{}", target.display()),
            renamed_after: false,
        };
    }
    let partial = partial_path(target);
    let err = in_scratch(target, scratch, ".err");
    Outgoing {
        uri: format!(
            "exec:if cat > {p} 2> {e} && mv {p} {t} 2>> {e}; then rm -f {e}; \
             else rm -f {p}; mv {e} {f} || : > {f}; fi",
            p = shell_quote(&partial.to_string_lossy()),
            t = shell_quote(&target.to_string_lossy()),
            e = shell_quote(&err.to_string_lossy()),
            f = shell_quote(&failed_path(target, scratch).to_string_lossy()),
        ),
        renamed_after: true,
    }
}

fn suffixed(target: &Path, suffix: &str) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    target.with_file_name(name)
}

fn in_scratch(target: &Path, scratch: &Path, suffix: &str) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    scratch.join(name)
}

/// The file a failed `exec:` migration leaves in `scratch`, holding the
/// error.
pub fn failed_path(target: &Path, scratch: &Path) -> PathBuf {
    in_scratch(target, scratch, ".failed")
}

/// Every file an outgoing migration to `target` may leave besides `target`.
pub fn leftovers(target: &Path, scratch: &Path) -> [PathBuf; 3] {
    [
        partial_path(target),
        in_scratch(target, scratch, ".err"),
        failed_path(target, scratch),
    ]
}

/// The file an `exec:` migration writes before renaming it.
pub fn partial_path(target: &Path) -> PathBuf {
    suffixed(target, ".partial")
}

/// The `migrate-incoming` URI that reads the stream from `source`.
pub fn incoming(version: Option<QemuVersion>, source: &Path) -> String {
    if supports_file_uri(version) {
        format!("file:{}", source.display())
    } else {
        format!("exec:cat {}", shell_quote(&source.to_string_lossy()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V72: QemuVersion = QemuVersion {
        major: 7,
        minor: 2,
        micro: 22,
    };
    const V90: QemuVersion = QemuVersion {
        major: 9,
        minor: 0,
        micro: 0,
    };

    #[test]
    fn uris_follow_the_qemu_version() {
        let t = Path::new("/s/it's/vmstate");
        let w = Path::new("/w");
        let o = outgoing(Some(V72), t, w);
        assert_eq!(
            o.uri,
            "exec:if cat > '/s/it'\\''s/vmstate.partial' 2> '/w/vmstate.err' \
             && mv '/s/it'\\''s/vmstate.partial' '/s/it'\\''s/vmstate' 2>> '/w/vmstate.err'; \
             then rm -f '/w/vmstate.err'; else rm -f '/s/it'\\''s/vmstate.partial'; \
             mv '/w/vmstate.err' '/w/vmstate.failed' || : > '/w/vmstate.failed'; fi"
        );
        assert!(o.renamed_after);
        assert_eq!(incoming(Some(V72), t), "exec:cat '/s/it'\\''s/vmstate'");
        assert_eq!(outgoing(Some(V90), t, w).uri, "file:/s/it's/vmstate");
        assert_eq!(incoming(Some(V90), t), "file:/s/it's/vmstate");
        assert!(outgoing(None, t, w).uri.starts_with("exec:"));
    }
}
