//! Linux direct boot: the bzImage, initrd, command line and zero page are
//! placed as the boot protocol wants, and the kernel starts executing in
//! 64-bit mode. (On the project's nested KVM, kernel code runs about a
//! thousand times slower than native, so the test does not wait for the
//! console; `vmm probe` tells whether a host can boot Linux in earnest.)

mod common;

use std::time::Duration;

use common::require_kvm;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};
use vmr_testkit::guest::GuestImage;
use vmr_vmm::boot::layout;
use vmr_vmm::vm::{BootSource, Vm, VmConfig};

#[test]
// Heavy: needs /dev/kvm and the Linux guest image (guest/linux/build.sh).
fn bzimage_initrd_and_zero_page_follow_the_boot_protocol() {
    require_kvm();
    let img = GuestImage::locate().unwrap_or_else(|e| panic!("{e}"));
    let mem_size = 256u64 << 20;
    let mut vm = Vm::new(VmConfig {
        mem_size,
        ..Default::default()
    })
    .expect("VM");
    let dev = vm.allocate_device("virtio-blk");
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1";
    vm.load(&BootSource::Linux {
        kernel: img.kernel.clone(),
        initrd: Some(img.initrd.clone()),
        cmdline: cmdline.into(),
        acpi: Some(Box::new(vmr_vmm::acpi::Acpi)),
    })
    .expect("bzImage loads");

    let mem = vm.memory();
    let gm = mem.guest_memory();
    let zp: boot_params = gm
        .read_obj(GuestAddress(layout::ZERO_PAGE))
        .expect("zero page");
    let hdr = zp.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448, "HdrS");
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.loadflags } & 1, 1, "LOADED_HIGH");
    let mut cl = vec![0u8; { hdr.cmdline_size } as usize];
    gm.read_slice(&mut cl, GuestAddress(u64::from(hdr.cmd_line_ptr)))
        .expect("command line");
    let expected = format!(
        "{cmdline} virtio_mmio.device=4K@{:#x}:{}",
        dev.mmio_base, dev.gsi
    );
    assert_eq!(String::from_utf8(cl).expect("ASCII"), expected);
    let initrd = std::fs::read(&img.initrd).expect("initrd");
    assert_eq!({ hdr.ramdisk_size } as usize, initrd.len());
    let addr = u64::from(hdr.ramdisk_image);
    assert_eq!(addr % 4096, 0);
    assert!(addr + initrd.len() as u64 <= mem_size);
    let mut placed = vec![0u8; initrd.len()];
    gm.read_slice(&mut placed, GuestAddress(addr))
        .expect("initrd");
    assert!(placed == initrd, "initrd bytes differ in guest memory");
    assert_eq!({ zp.acpi_rsdp_addr }, vmr_vmm::acpi::RSDP_ADDR);
    let mut sig = [0u8; 8];
    gm.read_slice(&mut sig, GuestAddress(vmr_vmm::acpi::RSDP_ADDR))
        .expect("RSDP");
    assert_eq!(&sig, b"RSD PTR ");
    assert_eq!(zp.e820_entries, 3);
    let last = zp.e820_table[2];
    assert_eq!(
        ({ last.addr }, { last.size }, { last.r#type }),
        (0x10_0000, mem_size - 0x10_0000, 1)
    );

    vm.start_paused().expect("vCPU starts paused");
    let regs = vm.vcpus()[0].get_regs().expect("regs");
    assert_eq!(regs.rip, 0x10_0200, "64-bit entry: load address + 0x200");
    assert_eq!(regs.rsi, layout::ZERO_PAGE);
    let sregs = vm.vcpus()[0].get_sregs().expect("sregs");
    assert_ne!(sregs.efer & (1 << 10), 0, "long mode");

    vm.resume().expect("run");
    assert!(
        vm.wait_for_stop(Duration::from_secs(3)).is_none(),
        "the kernel stopped the VM right away"
    );
    vm.pause().expect("pause");
    let rip = vm.vcpus()[0].get_regs().expect("regs").rip;
    assert_ne!(rip, 0x10_0200, "the kernel made progress");
}

/// Boots the Debian cloud kernel with a vhost-tap block device described by
/// ACPI (LNRO0005) to the image's `VMR-READY` shell marker. On a host whose
/// KVM cannot run Linux in useful time (this repository's nested KVM among
/// them) it is skipped, printing the probe's verdict.
#[test]
// Heavy: needs /dev/kvm, the Linux guest image and a KVM that runs Linux (vmm probe).
fn linux_boots_to_the_shell_marker_where_the_probe_allows() {
    require_kvm();
    let report = vmr_vmm::probe::run(Duration::from_secs(20)).expect("the probe runs");
    if !report.linux_bootable {
        eprintln!(
            "SKIPPED linux_boots_to_the_shell_marker_where_the_probe_allows: \
             vmm probe says this host cannot boot Linux: {} \
             (plain loop {:.0} ns/iter, CR3 reload {:.0} ns/iter)",
            report.verdict, report.plain_ns_per_iter, report.cr3_ns_per_iter
        );
        return;
    }
    let img = GuestImage::locate().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 << 20))
        .expect("temp dir is writable");
    let backend = vhost_tap::blk::BlockBackend::new(
        vhost_tap::blk::BlockConfig::new("vda"),
        vhost_tap::blk::Disk::open(&image, None, false).expect("image opens"),
        None,
        None,
        std::sync::Arc::new(vhost_tap::metrics::Metrics::default()),
    )
    .expect("valid config");
    let socket = dir.path().join("blk.sock");
    let server =
        vhost_tap::server::Server::spawn("blk", backend, &socket, true).expect("socket free");
    let console = vmr_vmm::serial::SharedBuffer::default();
    let mut vm = Vm::new(VmConfig {
        mem_size: 512 << 20,
        serial_out: Some(Box::new(console.clone())),
        ..Default::default()
    })
    .expect("VM");
    vmr_vmm::devices::attach(
        &vm,
        vmr_vmm::devices::VirtioSpec {
            kind: vmr_vmm::devices::mmio::DeviceKind::Block,
            socket,
            local_config: vmr_vmm::devices::mmio::DeviceKind::Block.local_config(64 << 20, [0; 6]),
        },
        None,
    )
    .expect("backend reachable");
    vm.load(&BootSource::Linux {
        kernel: img.kernel.clone(),
        initrd: Some(img.initrd.clone()),
        cmdline: "console=ttyS0 panic=-1 vmr.workload=disk".into(),
        acpi: Some(Box::new(vmr_vmm::acpi::Acpi)),
    })
    .expect("bzImage loads");
    vm.start().expect("vCPUs start");
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !String::from_utf8_lossy(&console.contents()).contains("VMR-DONE")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&console.contents()).into_owned();
    drop(vm);
    let _ = server.stop();
    assert!(
        text.contains("VMR-READY") && text.contains("disk=1"),
        "no shell marker with the ACPI-described disk; console:\n{text}"
    );
    assert!(text.contains("VMR-DONE ok=1 fail=0"), "console:\n{text}");
}
