//! Loading freestanding guests: ELF executables (through linux-loader's
//! `Elf`) and flat binaries (copied to 1 MiB and entered at their first
//! byte).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use crate::memory::GuestMemoryMmap;

/// Errors loading a kernel image.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image cannot be read.
    #[error("cannot read kernel image {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel image {path}")]
    Load {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The image does not fit in guest memory.
    #[error("kernel image {path} ({len} bytes) does not fit in guest memory at {at:#x}")]
    TooBig {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
        /// Load address.
        at: u64,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({len} bytes) does not fit in guest memory")]
    InitrdTooBig {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] super::BootError),
    /// The ACPI hook failed.
    #[error("cannot set up ACPI tables: {0}")]
    Acpi(String),
}

/// The kind of an image, guessed from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// ELF executable.
    Elf,
    /// Linux bzImage (setup header magic "HdrS" at 0x202).
    BzImage,
    /// Anything else: a flat binary.
    Flat,
}

/// Guesses the kind of image at `path`.
pub fn detect(path: &Path) -> Result<ImageKind, LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut head = vec![0u8; 0x206];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if head.starts_with(b"\x7fELF") {
        Ok(ImageKind::Elf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Ok(ImageKind::BzImage)
    } else {
        Ok(ImageKind::Flat)
    }
}

/// Loads an ELF executable at its physical addresses; returns its entry.
pub fn load_elf(mem: &GuestMemoryMmap, path: &Path) -> Result<GuestAddress, LoaderError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| LoaderError::Read {
        path: p.clone(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|source| LoaderError::Load { path: p, source })?;
    Ok(res.kernel_load)
}

/// Copies a flat binary to 1 MiB; returns its entry (its first byte).
pub fn load_flat(mem: &GuestMemoryMmap, path: &Path) -> Result<GuestAddress, LoaderError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| LoaderError::Read {
        path: p.clone(),
        source,
    })?;
    load_flat_bytes(mem, &bytes).map_err(|_| LoaderError::TooBig {
        path: p,
        len: bytes.len() as u64,
        at: layout::HIMEM_START,
    })
}

/// Copies flat code to 1 MiB; returns its entry.
pub fn load_flat_bytes(
    mem: &GuestMemoryMmap,
    code: &[u8],
) -> Result<GuestAddress, vm_memory::GuestMemoryError> {
    let at = GuestAddress(layout::HIMEM_START);
    mem.write_slice(code, at)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::VmMemory;

    #[test]
    fn detects_kinds_and_loads_flat() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flat = dir.path().join("flat.bin");
        std::fs::write(&flat, [0xe6, 0x80, 0xf4]).expect("write");
        assert_eq!(detect(&flat).expect("readable"), ImageKind::Flat);
        let elf = dir.path().join("x.elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").expect("write");
        assert_eq!(detect(&elf).expect("readable"), ImageKind::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzp = dir.path().join("bz");
        std::fs::write(&bzp, &bz).expect("write");
        assert_eq!(detect(&bzp).expect("readable"), ImageKind::BzImage);

        let m = VmMemory::new_shared(2 << 20).expect("memory");
        let entry = load_flat(m.guest_memory(), &flat).expect("fits");
        assert_eq!(entry.0, layout::HIMEM_START);
        let b: u8 = m
            .guest_memory()
            .read_obj(GuestAddress(layout::HIMEM_START + 2))
            .expect("in range");
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn truncated_elf_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elf = dir.path().join("x.elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").expect("write");
        let m = VmMemory::new_shared(2 << 20).expect("memory");
        assert!(matches!(
            load_elf(m.guest_memory(), &elf),
            Err(LoaderError::Load { .. })
        ));
        assert!(matches!(
            load_elf(m.guest_memory(), &dir.path().join("missing")),
            Err(LoaderError::Read { .. })
        ));
    }
}
