//! Whole-map reads and deletes in batches (`BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_DELETE_BATCH`): one
//! syscall per few thousand entries instead of two per entry. aya 0.14 has no batch API, so
//! these are raw `bpf()` calls. A kernel or map type that refuses them (`EINVAL`, `ENOTSUPP`)
//! is reported as [`Batch::Unsupported`], and the caller falls back to iterating key by key.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// `ENOTSUPP` (kernel-internal, 524), what map types without batch ops return.
const ENOTSUPP: i32 = 524;

/// Entries asked for per lookup call. A hash map's batch must hold at least one whole bucket,
/// so this is generous; the buffers are reused across calls.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The outcome of a batch operation.
#[derive(Debug)]
pub enum Batch<T> {
    Done(T),
    /// The kernel has no batch operation for this map: iterate instead.
    Unsupported,
}

/// The element member of `union bpf_attr`: `map_fd`, `key`, `value`, `flags`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Reads and deletes `key` in one step (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux
/// 5.14): no update between the read and the delete is lost to the map. `None`: not there.
pub fn lookup_and_delete<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: std::ptr::from_ref(key) as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; key and value point to
    // buffers of the map's key and value size that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw mut attr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: the kernel wrote a whole value; `V: Pod`.
    Ok(Some(unsafe { value.assume_init() }))
}

fn bpf(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the pointers in it point
    // to buffers that outlive the call and hold `count` elements.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP)
    )
}

/// Every entry of the hash map `fd` (key type `K`, value type `V`, as the map was created
/// with), read in batches. The batch token of a hash map is a `u32` bucket index.
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Batch<Vec<(K, V)>>> {
    let mut out = Vec::new();
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    keys.resize_with(CHUNK, MaybeUninit::uninit);
    values.resize_with(CHUNK, MaybeUninit::uninit);
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(()) => false,
            // The last batch: `count` holds what it returned (possibly none).
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
            Err(err) if first && unsupported(&err) => return Ok(Batch::Unsupported),
            Err(err) => return Err(err),
        };
        let filled = (attr.count as usize).min(CHUNK);
        for (key, value) in keys.iter().zip(&values).take(filled) {
            // SAFETY: the kernel wrote `filled` whole keys and values of the map's sizes, which
            // are those of `K` and `V` (a `Pod`: any bit pattern is valid).
            out.push(unsafe { (key.assume_init_read(), value.assume_init_read()) });
        }
        if done {
            return Ok(Batch::Done(out));
        }
        token = next;
        first = false;
    }
}

/// Deletes `keys` from the hash map `fd` in one call. Keys already gone make the kernel stop
/// with `ENOENT`; the caller passes only keys it has just read and no one else deletes.
pub fn delete<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<Batch<()>> {
    if keys.is_empty() {
        return Ok(Batch::Done(()));
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: fd.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
        Ok(()) => Ok(Batch::Done(())),
        Err(err) if unsupported(&err) => Ok(Batch::Unsupported),
        Err(err) => Err(err),
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i] -> values[i]` into map `fd` in one call per [`CHUNK`]. Returns how many
/// are surely written (whole chunks before an error), so the caller can write the rest one by
/// one and name the entry that fails.
pub fn update<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Batch<(usize, Option<io::Error>)> {
    let mut written = 0;
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len().min(values.len()) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => written += keys.len(),
            Err(err) if written == 0 && unsupported(&err) => return Batch::Unsupported,
            // The kernel reports how far it got only on some paths: count none of this chunk,
            // the caller writes it again (an upsert is idempotent).
            Err(err) => return Batch::Done((written, Some(err))),
        }
    }
    Batch::Done((written, None))
}
