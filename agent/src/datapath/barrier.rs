//! A wait for every running egret program to finish: the kernel's RCU grace period, reached
//! from userspace.
//!
//! A program reads the generation number, then looks up entries of that generation. After a
//! flip, the generation flipped away from may only be rewritten once no program can still be
//! between those two steps. Programs run under `rcu_read_lock()`, and on a preemptible kernel a
//! reader can be preempted or throttled for any length of time, so no sleep is long enough.
//! The kernel waits for them itself when userspace updates a map-in-map: `map_update_elem()`
//! calls `maybe_wait_bpf_programs()`, which is `synchronize_rcu_expedited()` for
//! `BPF_MAP_TYPE_ARRAY_OF_MAPS` (kernel/bpf/syscall.c; the kernel's selftests use the same trick
//! in `kern_sync_rcu()`). When the update returns, every program that started before it has
//! finished. The maps here are private to the agent; no program uses them.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// The leading fields of `union bpf_attr` for `BPF_MAP_CREATE` (include/uapi/linux/bpf.h); the
/// kernel treats the fields after them as zero.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// An array-of-maps and the map it holds; updating the one slot waits for running programs.
#[derive(Debug)]
pub struct ProgramBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl ProgramBarrier {
    /// Creates the two maps.
    pub fn new() -> io::Result<Self> {
        let inner = create(MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_name: *b"egret_barrier_i\0",
            ..MapCreateAttr::default()
        })?;
        let outer = create(MapCreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: fd_u32(&inner)?,
            map_name: *b"egret_barrier_o\0",
            ..MapCreateAttr::default()
        })?;
        Ok(Self { outer, inner })
    }

    /// Returns once every egret program (every BPF program) that was running when it was called
    /// has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = fd_u32(&self.inner)?;
        let attr = MapElemAttr {
            map_fd: fd_u32(&self.outer)?,
            _pad: 0,
            key: (&raw const key) as u64,
            value: (&raw const value) as u64,
            flags: 0,
        };
        // SAFETY: `attr` and the key and value it points to outlive the call; the kernel reads
        // `size_of::<MapElemAttr>()` bytes of it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &raw const attr,
                std::mem::size_of::<MapElemAttr>(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn create(attr: MapCreateAttr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` outlives the call; the kernel reads `size_of::<MapCreateAttr>()` bytes.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            std::mem::size_of::<MapCreateAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf() returned no fd"))?;
    // SAFETY: the kernel just handed us this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fd_u32(fd: &OwnedFd) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))
}
