//! The few kernel calls [`super::netlink::NetlinkLinks`] cannot make through netlink:
//! creating a persistent tap (`TUNSETIFF` + `TUNSETPERSIST` on `/dev/net/tun`), reading and
//! turning off TX checksum offload (`SIOCETHTOOL`), and giving the calling thread a new
//! network namespace (`unshare(CLONE_NEWNET)`).
//!
//! Each acts in the network namespace of the calling thread, so callers run them on a
//! thread that has entered the namespace wanted and exits afterwards.

#![allow(unsafe_code)]

use std::ffi::c_char;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `ETHTOOL_GTXCSUM` (`linux/ethtool.h`): read TX checksum offload.
const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `ETHTOOL_STXCSUM`: set TX checksum offload.
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// An `ifreq` naming `name`, everything else zero.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a device name"),
        ));
    }
    // SAFETY: `ifreq` is plain old data (a name and a union of integers, addresses and a
    // pointer) for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as c_char;
    }
    Ok(request)
}

/// Makes a persistent tap device without packet information headers, as `ip tuntap add
/// NAME mode tap` does; attaching to a tap of that name that exists is harmless.
pub(super) fn create_persistent_tap(name: &str) -> io::Result<()> {
    let mut request = ifreq(name)?;
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // The descriptor is closed on return: with TUNSETPERSIST the device outlives it, and
    // QEMU opens it again by name.
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is, and the
    // descriptor is an open `/dev/net/tun`.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes an integer argument, not a pointer; the descriptor is
    // now attached to the tap.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A datagram socket for device ioctls in the calling thread's namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One `SIOCETHTOOL` call with an `ethtool_value`; returns its `data`.
fn ethtool_value(name: &str, cmd: u32, data: u32) -> io::Result<u32> {
    let socket = control_socket()?;
    let mut value = EthtoolValue { cmd, data };
    let mut request = ifreq(name)?;
    request.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast::<c_char>();
    // SAFETY: SIOCETHTOOL reads the `ifreq` and, through `ifru_data`, the command
    // structure: `value` is a `struct ethtool_value`, as GTXCSUM and STXCSUM expect, and
    // outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Whether TX checksum offload is on (`ethtool -k NAME`, `tx-checksumming`).
pub(super) fn tx_checksum(name: &str) -> io::Result<bool> {
    Ok(ethtool_value(name, ETHTOOL_GTXCSUM, 0)? != 0)
}

/// Turns TX checksum offload on or off (`ethtool -K NAME tx on|off`).
pub(super) fn set_tx_checksum(name: &str, on: bool) -> io::Result<()> {
    ethtool_value(name, ETHTOOL_STXCSUM, u32::from(on)).map(|_| ())
}

/// Moves the calling thread into a new, empty network namespace.
///
/// Only for a thread that exits afterwards (or never touches anything else): the rest of
/// the process stays where it was.
pub(super) fn unshare_network_namespace() -> io::Result<()> {
    // SAFETY: CLONE_NEWNET changes only the calling thread's network namespace; file
    // descriptor tables and memory are untouched (the hazard `unshare_unsafe` warns of is
    // CLONE_FILES).
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(io::Error::from)
}
