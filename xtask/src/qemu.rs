//! The QEMU guest the vhost-user tests boot: QEMU 7.2 unpacked beside the
//! system (installing `qemu-system-x86` would remove the newer
//! `qemu-utils` some machines carry), a Debian kernel, and a busybox
//! initramfs whose init brings eth0 up with the addresses given on the
//! kernel command line, pings the peers, fetches a file over TCP, has a
//! peer fetch one from it, prints the results on the serial console and
//! powers off.
//!
//! Everything lands in `target/qemu-guest/`; a complete directory is kept.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{ensure_packages, run};

/// Where the guest is prepared.
pub fn dir(root: &Path) -> PathBuf {
    root.join("target/qemu-guest")
}

/// The guest's init: its settings come from the kernel command line
/// (`ipoib.ip4=`, `ipoib.ip6=`, `ipoib.peer4=`, `ipoib.peer6=`,
/// `ipoib.url=`, and `ipoib.fetch=`: a URL on a peer that fetches
/// `http://GUEST:8001/blob`, 1 MB the guest serves, and answers how many
/// bytes it got).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for kv in $(cat /proc/cmdline); do
  case "$kv" in
    ipoib.*=*) k=${kv%%=*}; k=${k#ipoib.}; eval "CFG_$k=${kv#*=}" ;;
  esac
done
echo "GUEST-UP"
for m in failover net_failover virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_net; do
  insmod /lib/modules/$m.ko || echo "GUEST-INSMOD-FAILED $m"
done
ip link set eth0 up
ip addr add "$CFG_ip4" dev eth0
ip -6 addr add "$CFG_ip6" dev eth0
echo "GUEST-ETH0 mtu=$(cat /sys/class/net/eth0/mtu)"
# Duplicate address detection takes a second.
sleep 2
if ping -c 3 -W 3 "$CFG_peer4" > /tmp/p4; then echo "GUEST-PING4-OK"; else echo "GUEST-PING4-FAILED"; cat /tmp/p4; fi
if ping -6 -c 3 -W 3 "$CFG_peer6" > /tmp/p6; then echo "GUEST-PING6-OK"; else echo "GUEST-PING6-FAILED"; cat /tmp/p6; fi
if ping -c 2 -s 3000 -W 3 "$CFG_peer4" > /tmp/pf; then echo "GUEST-PING-FRAG-OK"; else echo "GUEST-PING-FRAG-FAILED"; fi
echo "GUEST-TCP bytes=$(wget -q -O - "$CFG_url" | wc -c)"
if [ -n "$CFG_fetch" ]; then
  mkdir -p /www && dd if=/dev/zero of=/www/blob bs=1000 count=1000 2>/dev/null
  httpd -p 8001 -h /www
  echo "GUEST-UPLOAD $(wget -q -O - "$CFG_fetch")"
fi
echo "GUEST-STATS tx=$(cat /sys/class/net/eth0/statistics/tx_packets) rx=$(cat /sys/class/net/eth0/statistics/rx_packets)"
echo "GUEST-DONE"
poweroff -f
"#;

/// The preparation, as a shell script run in the guest directory.
const PREPARE: &str = r#"set -e
mkdir -p debs pkg k ir/bin ir/proc ir/sys ir/dev ir/lib/modules ir/tmp
(cd debs && apt-get download -q qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
for d in debs/qemu-system-*.deb debs/seabios*.deb debs/ipxe-qemu*.deb; do dpkg -x "$d" pkg; done
if ldd pkg/usr/bin/qemu-system-x86_64 | grep 'not found'; then echo 'QEMU is missing libraries' >&2; exit 1; fi
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
(cd debs && apt-get download -q "$KPKG")
dpkg-deb --fsys-tarfile debs/${KPKG}_*.deb | tar -x -C k --wildcards './boot/vmlinuz-*' \
  './lib/modules/*/kernel/drivers/virtio/virtio*.ko' './lib/modules/*/kernel/drivers/net/virtio_net.ko' \
  './lib/modules/*/kernel/drivers/net/net_failover.ko' './lib/modules/*/kernel/net/core/failover.ko'
cp k/boot/vmlinuz-* vmlinuz
cp /bin/busybox ir/bin/
find k/lib/modules -name '*.ko' -exec cp {} ir/lib/modules/ \;
cp init ir/init && chmod +x ir/init
(cd ir && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
rm -rf debs k ir
touch ready
"#;

/// Prepares the guest unless a complete one is there.
pub fn prepare(root: &Path) -> Result<PathBuf, String> {
    let dir = dir(root);
    // A guest prepared with another init is prepared again.
    let same_init = std::fs::read_to_string(dir.join("init")).is_ok_and(|i| i == INIT);
    if dir.join("ready").is_file() && same_init {
        write_boot(&dir)?;
        return Ok(dir);
    }
    // busybox-static: the initramfs shell; cpio packs it; QEMU's own
    // shared libraries come from the distribution. The package lists must
    // be fresh for `apt-get download`.
    ensure_packages(&[("busybox-static", "busybox"), ("cpio", "cpio")])?;
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-qq"]),
    )?;
    let deps = Command::new("apt-cache")
        .args(["depends", "qemu-system-x86"])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let libs: Vec<String> = String::from_utf8_lossy(&deps.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("lib") || p.starts_with("zlib"))
        .filter(|p| !p.starts_with('<'))
        .map(str::to_string)
        .collect();
    if !libs.is_empty() {
        run(
            "apt-get install (QEMU's libraries)",
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "--no-upgrade",
                ])
                .args(&libs)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("init"), INIT).map_err(|e| format!("writing init: {e}"))?;
    run(
        "prepare the QEMU guest (QEMU 7.2, Debian kernel, busybox initramfs)",
        Command::new("sh").args(["-c", PREPARE]).current_dir(&dir),
    )?;
    write_boot(&dir)?;
    Ok(dir)
}

/// `boot SOCKET MAC [KERNEL ARGS...]`, written into the guest directory:
/// QEMU (TCG, one vCPU, 256 MiB of shared memory) booting the guest with
/// its virtio-net NIC (MAC `MAC`) on the vhost-user socket `SOCKET`; the
/// arguments after them add to the kernel command line (the `ipoib.*`
/// settings). The demo and the VM test both boot through it.
const BOOT: &str = r#"#!/bin/sh
set -e
d=$(cd "$(dirname "$0")" && pwd)
sock=$1; mac=$2; shift 2
export QEMU_MODULE_DIR="$d/pkg/usr/lib/x86_64-linux-gnu/qemu"
# INTx (vectors=0): QEMU 7.2's MSI-X path crashes under TCG with vhost-user.
exec "$d/pkg/usr/bin/qemu-system-x86_64" \
  -L "$d/pkg/usr/share/qemu" -L "$d/pkg/usr/share/seabios" -L "$d/pkg/usr/lib/ipxe/qemu" \
  -accel tcg -machine q35 -cpu max -smp 1 -m 256M \
  -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
  -chardev "socket,id=char0,path=$sock" -netdev vhost-user,id=net0,chardev=char0 \
  -device "virtio-net-pci,netdev=net0,mac=$mac,vectors=0,romfile=,host_mtu=2044" \
  -nodefaults -display none -serial stdio -no-reboot \
  -kernel "$d/vmlinuz" -initrd "$d/initrd.gz" -append "console=ttyS0 panic=-1 quiet $*"
"#;

/// Writes the `boot` script (always: it may have changed since the guest
/// was prepared).
fn write_boot(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for (name, text) in [("boot", BOOT), ("fetch.cgi", FETCH_CGI)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// `fetch.cgi`, written into the guest directory: a CGI for the peer's
/// busybox httpd (as `cgi-bin/fetch`, the guest's `ipoib.fetch=`) that
/// fetches the guest's 1 MB and answers `fetched=BYTES`.
const FETCH_CGI: &str = r#"#!/bin/sh
n=$(/bin/busybox wget -q -O - "http://$REMOTE_ADDR:8001/blob" | wc -c)
printf 'Content-Type: text/plain\r\n\r\nfetched=%s\n' "$n"
"#;

/// The guest in `dir` booting with its NIC on `vm_sock`; `append` adds
/// to the kernel command line.
pub fn command(dir: &Path, vm_sock: &Path, append: &str) -> Command {
    let mut c = Command::new(dir.join("boot"));
    c.arg(vm_sock)
        .arg("52:54:00:12:34:56")
        .args(append.split_whitespace());
    c
}
