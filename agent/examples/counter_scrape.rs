//! Times one scrape of a full counter map (65,536 entries, egret's `CounterKey` and
//! `CounterValue`), read in batches as `Datapath::counters` does and key by key as before; run
//! by `cargo xtask bench`. Prints one JSON line. Needs root (it creates a private hash map).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Instant,
};

use aya::maps::{HashMap, Map, MapData};
use egret::datapath::batch::{self, Batch};
use egret_common::{CounterKey, CounterValue, capacity};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_HASH: u32 = 1;

#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed, pointing to live buffers.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn main() -> anyhow::Result<()> {
    let entries = capacity::COUNTERS;
    let fd = bpf(
        BPF_MAP_CREATE,
        &mut CreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: size_of::<CounterKey>() as u32,
            value_size: size_of::<CounterValue>() as u32,
            max_entries: entries,
        },
    )?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    for i in 0..entries {
        let mut key = CounterKey {
            endpoint_id: 1 + i % 64,
            rule_id: 7,
            family: 2,
            protocol: 17,
            ..CounterKey::default()
        };
        key.addr[..4].copy_from_slice(&(0x0a00_0000 + i).to_be_bytes());
        let value = CounterValue {
            attempts: u64::from(i),
        };
        bpf(
            BPF_MAP_UPDATE_ELEM,
            &mut ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                _pad: 0,
                key: &raw const key as u64,
                value: &raw const value as u64,
                flags: 0,
            },
        )?;
    }
    let start = Instant::now();
    let batched = match batch::lookup_all::<CounterKey, CounterValue>(fd.as_fd())? {
        Batch::Done(all) => Some(all.len()),
        Batch::Unsupported => None,
    };
    let batched_ms = start.elapsed().as_secs_f64() * 1e3;
    let map: HashMap<MapData, CounterKey, CounterValue> =
        HashMap::try_from(Map::HashMap(MapData::from_fd(fd)?))?;
    let start = Instant::now();
    let one_by_one = map.iter().collect::<Result<Vec<_>, _>>()?.len();
    let key_by_key_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "entries": entries,
            "batched_read": batched,
            "batched_ms": batched.map(|_| batched_ms),
            "key_by_key_read": one_by_one,
            "key_by_key_ms": key_by_key_ms,
        })
    );
    Ok(())
}
