//! `vmr image list|show|build`: machine images (directories with an
//! `image.toml`), found under the cache (`$VMR_CACHE`, else
//! `~/.cache/vmreplay`) and the configured image path.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use vmr_hypervisor::image::{DiskSource, MachineImage, IMAGE_FILE};
use vmr_hypervisor::DriverError;

use crate::config::Config;
use crate::error::{CliError, CliResult};
use crate::output::{println_safe, Out, Table};

/// `vmr image` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the images under the cache and the image path.
    List,
    /// Load, validate and show one image (by name or directory).
    Show(ShowArgs),
    /// Build the Linux guest image (guest/linux/build.sh).
    Build(BuildArgs),
}

/// Arguments of `vmr image show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// An image name (as listed) or an image directory.
    pub image: String,
}

/// Arguments of `vmr image build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Rebuild even if a cached build matches the sources.
    #[arg(long)]
    pub force: bool,
}

/// One image directory found, loaded or not.
#[derive(Debug)]
pub struct Found {
    /// The directory as found (symlinks kept).
    pub dir: PathBuf,
    /// Other directory names that point at the same image.
    pub aliases: Vec<PathBuf>,
    /// The loaded image, or why it does not load.
    pub image: Result<MachineImage, DriverError>,
}

fn roots(cfg: &Config) -> Vec<PathBuf> {
    let mut r = vec![cfg.cache_dir.clone()];
    r.extend(cfg.image_path.iter().cloned());
    r
}

/// Every image directory under the roots: a root that is an image itself, or
/// its direct subdirectories that hold an `image.toml`. Directories reached
/// by several names (symlinks) are listed once, under their shortest name.
pub fn discover(cfg: &Config) -> Vec<Found> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for root in roots(cfg) {
        if root.join(IMAGE_FILE).is_file() {
            dirs.push(root.clone());
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&root) else {
            continue;
        };
        let mut sub: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(IMAGE_FILE).is_file())
            .collect();
        sub.sort();
        dirs.extend(sub);
    }
    // Group by canonical directory.
    let mut groups: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    for d in dirs {
        let canon = std::fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        match groups.iter_mut().find(|(c, _)| *c == canon) {
            Some((_, names)) => names.push(d),
            None => groups.push((canon, vec![d])),
        }
    }
    groups
        .into_iter()
        .map(|(_, mut names)| {
            names.sort_by_key(|n| (n.as_os_str().len(), n.clone()));
            names.dedup();
            let dir = names.remove(0);
            let image = MachineImage::load(&dir);
            Found {
                dir,
                aliases: names,
                image,
            }
        })
        .collect()
}

fn image_error(dir: &Path, e: &DriverError) -> CliError {
    match e {
        DriverError::Image { field, reason, .. } => CliError::precondition(format!(
            "image {} is invalid: field `{field}`: {reason}",
            dir.display()
        ))
        .hint(format!(
            "fix `{field}` in {}/{IMAGE_FILE} (format: docs/guest-images.md), or rebuild with `vmr image build --force`",
            dir.display()
        )),
        other => CliError::precondition(format!("image {}: {other}", dir.display())),
    }
}

fn error_json(e: &DriverError) -> Value {
    match e {
        DriverError::Image { field, reason, .. } => json!({ "field": field, "reason": reason }),
        other => json!({ "field": null, "reason": other.to_string() }),
    }
}

fn image_json(dir: &Path, aliases: &[PathBuf], img: &MachineImage) -> Value {
    let disks: Vec<Value> = img
        .disks
        .iter()
        .map(|d| match &d.source {
            DiskSource::Blank(bytes) => json!({ "name": d.name, "blank_bytes": bytes }),
            DiskSource::File(f) => json!({ "name": d.name, "file": f }),
        })
        .collect();
    let nics: Vec<Value> = img
        .nics
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "mac": n.mac.to_string(),
                "ip": n.ip.map(|(a, p)| format!("{a}/{p}")),
                "peer": n.peer.map(|a| a.to_string()),
            })
        })
        .collect();
    json!({
        "name": img.name,
        "dir": dir,
        "aliases": aliases,
        "valid": true,
        "description": img.description,
        "drivers": img.drivers,
        "kernel": img.kernel,
        "initrd": img.initrd,
        "cmdline": img.cmdline,
        "memory_mib": img.memory_mib,
        "vcpus": img.vcpus,
        "qemu_devices": img.qemu_devices,
        "disks": disks,
        "nics": nics,
        "service": img.service.as_ref().map(|s| json!({ "port": s.port, "protocol": s.protocol })),
    })
}

fn list(cfg: &Config, out: &Out) -> CliResult {
    let found = discover(cfg);
    if out.json {
        let items: Vec<Value> = found
            .iter()
            .map(|f| match &f.image {
                Ok(img) => image_json(&f.dir, &f.aliases, img),
                Err(e) => json!({
                    "name": null,
                    "dir": f.dir,
                    "aliases": f.aliases,
                    "valid": false,
                    "error": error_json(e),
                }),
            })
            .collect();
        out.json_doc(&json!({ "images": items, "searched": roots(cfg) }));
        return Ok(());
    }
    if found.is_empty() {
        out.progress(&format!(
            "no images under {}; build one with `vmr image build`",
            roots(cfg)
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return Ok(());
    }
    let mut t = Table::new(&["NAME", "DRIVERS", "MEMORY", "VCPUS", "DIR", "STATUS"]);
    for f in &found {
        match &f.image {
            Ok(img) => t.row(vec![
                img.name.clone(),
                img.drivers.join(","),
                format!("{} MiB", img.memory_mib),
                img.vcpus.to_string(),
                f.dir.display().to_string(),
                "ok".into(),
            ]),
            Err(e) => t.row(vec![
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                f.dir.display().to_string(),
                format!("invalid: {e}"),
            ]),
        }
    }
    t.print();
    Ok(())
}

/// Resolves a name or a directory to an image directory.
fn resolve(cfg: &Config, what: &str) -> CliResult<(PathBuf, Vec<PathBuf>)> {
    let as_path = Path::new(what);
    if what.contains('/') || as_path.join(IMAGE_FILE).is_file() {
        if !as_path.join(IMAGE_FILE).is_file() {
            return Err(
                CliError::not_found(format!("{} has no {IMAGE_FILE}", as_path.display()))
                    .hint("pass an image directory, or a name from `vmr image list`"),
            );
        }
        return Ok((as_path.to_path_buf(), Vec::new()));
    }
    let found = discover(cfg);
    let hit = found.into_iter().find(|f| {
        let by_name = matches!(&f.image, Ok(img) if img.name == what);
        let by_dir = std::iter::once(&f.dir)
            .chain(&f.aliases)
            .any(|d| d.file_name().is_some_and(|n| n == what));
        by_name || by_dir
    });
    match hit {
        Some(f) => Ok((f.dir, f.aliases)),
        None => Err(CliError::not_found(format!("no image named {what:?}")).hint(format!(
            "see `vmr image list`; images are searched under {}; build the demo image with `vmr image build`",
            roots(cfg)
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn print_image(dir: &Path, aliases: &[PathBuf], img: &MachineImage) {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    t.row(vec!["name".into(), img.name.clone()]);
    t.row(vec!["dir".into(), dir.display().to_string()]);
    if !aliases.is_empty() {
        t.row(vec![
            "aliases".into(),
            aliases
                .iter()
                .map(|a| a.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ]);
    }
    t.row(vec!["description".into(), img.description.clone()]);
    t.row(vec!["drivers".into(), img.drivers.join(", ")]);
    t.row(vec!["kernel".into(), img.kernel.display().to_string()]);
    if let Some(i) = &img.initrd {
        t.row(vec!["initrd".into(), i.display().to_string()]);
    }
    t.row(vec!["cmdline".into(), img.cmdline.clone()]);
    t.row(vec!["memory".into(), format!("{} MiB", img.memory_mib)]);
    t.row(vec!["vcpus".into(), img.vcpus.to_string()]);
    if !img.qemu_devices.is_empty() {
        t.row(vec!["qemu devices".into(), img.qemu_devices.join(", ")]);
    }
    for d in &img.disks {
        let src = match &d.source {
            DiskSource::Blank(b) => format!("blank, {}", crate::util::human_bytes(*b)),
            DiskSource::File(f) => f.display().to_string(),
        };
        t.row(vec![format!("disk {}", d.name), src]);
    }
    for n in &img.nics {
        let mut v = n.mac.to_string();
        if let Some((a, p)) = n.ip {
            v.push_str(&format!(", {a}/{p}"));
        }
        if let Some(peer) = n.peer {
            v.push_str(&format!(", peer {peer}"));
        }
        t.row(vec![format!("nic {}", n.name), v]);
    }
    if let Some(s) = &img.service {
        t.row(vec![
            "service".into(),
            format!("{} on port {}", s.protocol, s.port),
        ]);
    }
    t.print();
}

fn show(cfg: &Config, a: &ShowArgs, out: &Out) -> CliResult {
    let (dir, aliases) = resolve(cfg, &a.image)?;
    let img = MachineImage::load(&dir).map_err(|e| image_error(&dir, &e))?;
    if out.json {
        out.json_doc(&image_json(&dir, &aliases, &img));
    } else {
        print_image(&dir, &aliases, &img);
    }
    Ok(())
}

fn build(cfg: &Config, a: &BuildArgs, out: &Out) -> CliResult {
    let script = crate::util::checkout_root().join("guest/linux/build.sh");
    if !script.is_file() {
        return Err(CliError::precondition(format!(
            "the image build script {} does not exist",
            script.display()
        ))
        .hint("run vmr from a vmreplay checkout, or set VMR_ROOT to one"));
    }
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("VMR_CACHE", &cfg.cache_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if a.force {
        cmd.arg("--force");
    }
    out.progress(&format!(
        "building the Linux guest image ({})",
        script.display()
    ));
    let started = std::time::Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        CliError::other(format!("cannot run {}: {e}", script.display())).hint("install bash")
    })?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let quiet = out.quiet;
    // On a terminal a spinner shows the current step; otherwise (and above
    // the spinner) the script's step lines, numbered, with elapsed time.
    let bar = crate::progress::bar(out, None, false);
    bar.set_message("building the image");
    let spinner = crate::progress::enabled(out).then(|| bar.clone());
    let relay = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        for (n, line) in BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .enumerate()
        {
            let text = format!(
                "[{:>4.0}s] step {}: {line}",
                started.elapsed().as_secs_f64(),
                n + 1
            );
            match &spinner {
                Some(pb) => {
                    pb.println(&text);
                    pb.set_message(format!("step {}: {line}", n + 1));
                }
                None if !quiet => eprintln!("{text}"),
                None => {}
            }
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });
    let mut stdout = String::new();
    if let Some(mut so) = child.stdout.take() {
        use std::io::Read;
        let _ = so.read_to_string(&mut stdout);
    }
    let status = child
        .wait()
        .map_err(|e| CliError::other(format!("waiting for the image build: {e}")))?;
    let tail = relay.join().unwrap_or_default();
    bar.finish_and_clear();
    if !status.success() {
        return Err(CliError::other(format!(
            "the image build failed ({status}); last lines:\n{}",
            tail.join("\n")
        ))
        .hint("fix what the build says above (missing packages: scripts/setup.sh installs them)"));
    }
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| PathBuf::from(l.trim()))
        .ok_or_else(|| CliError::other("the image build printed no image directory"))?;
    let img = MachineImage::load(&dir).map_err(|e| image_error(&dir, &e))?;
    let secs = started.elapsed().as_secs_f64();
    if out.json {
        let mut v = image_json(&dir, &[], &img);
        v["build_seconds"] = json!(secs);
        out.json_doc(&v);
    } else {
        println_safe(&format!(
            "built {} in {secs:.1} s: {}",
            img.name,
            dir.display()
        ));
    }
    Ok(())
}

/// Runs an `image` subcommand.
pub fn run(cfg: &Config, c: &ImageCommand, out: &Out) -> CliResult {
    match c {
        ImageCommand::List => list(cfg, out),
        ImageCommand::Show(a) => show(cfg, a, out),
        ImageCommand::Build(a) => build(cfg, a, out),
    }
}
