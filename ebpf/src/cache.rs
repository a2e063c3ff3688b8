//! The decision cache: decisions already made, keyed by the policy epoch, so that a repeated
//! destination (every datagram of an unconnected UDP flow, every reconnect) skips the two trie
//! lookups. Counting and reporting are not cached: every attempt is still counted, and every
//! blocked or audit attempt still reported.
//!
//! Why a cached decision never outlives the policy that made it: the key holds the epoch (the
//! flip count in `EGRET_STATE`, which the agent raises at every flip), so after a flip no
//! program computes an old key again. A program that read the old epoch before the flip may
//! still insert under it, but the agent's wait for running programs after the flip
//! (`docs/datapath.md`, "Atomic policy changes") ends only once that program has returned.
//!
//! Why a plain preallocated hash and not an LRU: a preallocated element that is deleted (or
//! evicted) can be reused for another key while a program still reads it, which would hand
//! that program another destination's verdict. Here an element is never replaced (inserts use
//! `BPF_NOEXIST`) and never evicted; the agent deletes only entries of past epochs, after that
//! wait, when no program can hold them. A full cache only means misses until the next flip.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::HashMap};
use egret_common::{DecisionCacheKey, PolicyValue, capacity};

#[map(name = "EGRET_DECISION_CACHE")]
static DECISION_CACHE: HashMap<DecisionCacheKey, PolicyValue> =
    HashMap::pinned(capacity::DECISION_CACHE, 0);

/// The decision for (`epoch`, `endpoint_id`, destination, `protocol`, `port`): the cached one,
/// else `decide()`'s, which is then cached. `dest` is the address as the counters store it, and
/// its family.
#[inline(always)]
pub fn decide_with(
    epoch: u32,
    endpoint_id: u32,
    (addr, family): ([u8; 16], u8),
    protocol: u8,
    port: u16,
    decide: impl FnOnce() -> PolicyValue,
) -> PolicyValue {
    let key = DecisionCacheKey {
        epoch,
        endpoint_id,
        addr,
        port,
        family,
        protocol,
    };
    // SAFETY: an element is written whole at insert and then neither replaced nor deleted while
    // a program can reach it (see the module doc), so the copy is never torn or aliased.
    if let Some(decision) = unsafe { DECISION_CACHE.get(key) } {
        return *decision;
    }
    let decision = decide();
    // Fails when another CPU cached the same decision first, or the cache is full: either way
    // the next attempt is still decided correctly.
    let _ = DECISION_CACHE.insert(key, decision, u64::from(BPF_NOEXIST));
    decision
}
