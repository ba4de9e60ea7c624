//! Snapshots as QEMU migration streams in a file.
//!
//! QEMU 8.2 and later migrate straight to and from a file (`file:` URIs);
//! older versions get the stream through a shell command (`exec:`). The
//! outgoing command writes to `<file>.partial` and renames it into place
//! once `cat` has written everything, so the file exists under its final
//! name only when it is complete.

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

/// The migration URI that writes the stream to `target`.
pub fn outgoing(version: Option<QemuVersion>, target: &Path) -> Outgoing {
    if supports_file_uri(version) {
        return Outgoing {
            uri: format!("file:{}", target.display()),
            renamed_after: false,
        };
    }
    let partial = partial_path(target);
    Outgoing {
        uri: format!(
            "exec:cat > {p} && mv {p} {t}",
            p = shell_quote(&partial.to_string_lossy()),
            t = shell_quote(&target.to_string_lossy())
        ),
        renamed_after: true,
    }
}

/// The file an `exec:` migration writes before renaming it.
pub fn partial_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    target.with_file_name(name)
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
        let o = outgoing(Some(V72), t);
        assert_eq!(
            o.uri,
            "exec:cat > '/s/it'\\''s/vmstate.partial' && mv '/s/it'\\''s/vmstate.partial' '/s/it'\\''s/vmstate'"
        );
        assert!(o.renamed_after);
        assert_eq!(incoming(Some(V72), t), "exec:cat '/s/it'\\''s/vmstate'");
        assert_eq!(outgoing(Some(V90), t).uri, "file:/s/it's/vmstate");
        assert_eq!(incoming(Some(V90), t), "file:/s/it's/vmstate");
        assert!(outgoing(None, t).uri.starts_with("exec:"));
    }
}
