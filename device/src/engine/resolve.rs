//! Resolution caches with packet queueing and ageing, clock passed in.
//!
//! One generic cache serves both of IPoIB's tables:
//!
//! - the neighbour table, IP address → [`HwAddr`](super::addr::HwAddr),
//!   resolved by ARP or neighbour solicitation and aged out when unused
//!   (Linux: 2 × ARP `gc_interval`, 60 s);
//! - the path table, destination GID → address-handle parameters, resolved
//!   by an SA PathRecord query, kept until flushed, with at most 3 packets
//!   queued while the query runs (`IPOIB_MAX_PATH_REC_QUEUE`).
//!
//! The cache never sends anything: it tells the caller when to start or
//! retry a query and hands back queued packets when the answer arrives or
//! the attempt is abandoned. `P` is whatever the caller uses to name a
//! packet buffer, so queueing costs no allocation per packet beyond the
//! bounded queue itself.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Timers and limits of one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Packets held per unresolved key; more are dropped.
    pub queue_limit: usize,
    /// Queries sent before the key is declared unreachable.
    pub attempts: u32,
    /// Wait between queries.
    pub retry_interval: Duration,
    /// A resolved entry unused this long is removed; `None` keeps it until
    /// flushed.
    pub idle_timeout: Option<Duration>,
    /// Most entries held (the kernel's `gc_thresh3`); past it, new keys
    /// are refused until ageing or a flush makes room, so a peer cannot
    /// grow the table without bound.
    pub max_entries: usize,
}

impl Config {
    /// The neighbour table: ARP/ND with 3 probes one second apart (the
    /// kernel's `mcast_solicit` and `retrans_time`), 3 packets queued, aged
    /// after 60 s unused.
    pub const NEIGHBOURS: Config = Config {
        queue_limit: 3,
        attempts: 3,
        retry_interval: Duration::from_secs(1),
        idle_timeout: Some(Duration::from_secs(60)),
        max_entries: 1024,
    };

    /// The path table: one PathRecord query (the MAD layer retries it),
    /// given up after its 1 s timeout, 3 packets queued, no ageing.
    pub const PATHS: Config = Config {
        queue_limit: 3,
        attempts: 1,
        retry_interval: Duration::from_secs(1),
        idle_timeout: None,
        max_entries: 1024,
    };
}

/// The answer to [`Cache::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<V, P> {
    /// Resolved: send `packet` with `value`. `refresh` asks the caller to
    /// start a new query, because the entry was invalidated by a flush; the
    /// old value stays usable meanwhile.
    Ready {
        /// The resolved value.
        value: V,
        /// The packet, handed back.
        packet: P,
        /// Whether to start a query to refresh the entry.
        refresh: bool,
    },
    /// Queued; `start` asks the caller to send the first query.
    Queued {
        /// Whether this lookup created the entry.
        start: bool,
    },
    /// The queue is full: the packet is handed back to be dropped and
    /// counted.
    QueueFull(P),
}

/// What [`Cache::poll`] reports.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<K, P> {
    /// Send another query for `K`.
    Retry(K),
    /// Resolution of `K` failed: the queued packets are handed back to be
    /// dropped and counted.
    Unreachable(K, Vec<P>),
    /// The resolved entry for `K` was unused for the idle timeout and is
    /// gone.
    Expired(K),
}

#[derive(Debug)]
enum State<V, P> {
    Pending {
        queue: VecDeque<P>,
        sent: u32,
        next: Instant,
    },
    Resolved {
        value: V,
        used: Instant,
        valid: bool,
        querying: bool,
    },
}

/// A snapshot of one entry, for `ipoib-tool neigh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo<K, V> {
    /// The key.
    pub key: K,
    /// The value, once resolved.
    pub value: Option<V>,
    /// Packets waiting (pending entries).
    pub queued: usize,
    /// Time since last use (resolved entries) or since the last query.
    pub age: Duration,
    /// False once invalidated by a flush until refreshed.
    pub valid: bool,
}

/// A resolution cache; see the module documentation.
#[derive(Debug)]
pub struct Cache<K, V, P> {
    cfg: Config,
    entries: HashMap<K, State<V, P>>,
}

impl<K: Eq + Hash + Copy, V: Copy, P> Cache<K, V, P> {
    /// An empty cache.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            entries: HashMap::new(),
        }
    }

    /// Number of entries, pending or resolved.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The resolved value of `key`, without counting as a use.
    pub fn peek(&self, key: &K) -> Option<V> {
        match self.entries.get(key) {
            Some(State::Resolved { value, .. }) => Some(*value),
            _ => None,
        }
    }

    /// Looks `key` up to send `packet`.
    pub fn lookup(&mut self, key: K, packet: P, now: Instant) -> Lookup<V, P> {
        let retry = self.cfg.retry_interval;
        let limit = self.cfg.queue_limit;
        match self.entries.get_mut(&key) {
            Some(State::Resolved {
                value,
                used,
                valid,
                querying,
            }) => {
                *used = now;
                let refresh = !*valid && !*querying;
                *querying |= refresh;
                Lookup::Ready {
                    value: *value,
                    packet,
                    refresh,
                }
            }
            Some(State::Pending { queue, .. }) => {
                if queue.len() >= limit {
                    Lookup::QueueFull(packet)
                } else {
                    queue.push_back(packet);
                    Lookup::Queued { start: false }
                }
            }
            None => {
                if limit == 0 || self.entries.len() >= self.cfg.max_entries {
                    return Lookup::QueueFull(packet);
                }
                let mut queue = VecDeque::with_capacity(limit);
                queue.push_back(packet);
                self.entries.insert(
                    key,
                    State::Pending {
                        queue,
                        sent: 1,
                        next: now + retry,
                    },
                );
                Lookup::Queued { start: true }
            }
        }
    }

    /// Records an answer (an ARP reply, a PathRecord): the entry becomes
    /// resolved and valid, and the packets queued for it are returned to be
    /// sent with `value`, oldest first.
    pub fn resolve(&mut self, key: K, value: V, now: Instant) -> VecDeque<P> {
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cfg.max_entries {
            return VecDeque::new();
        }
        let old = self.entries.insert(
            key,
            State::Resolved {
                value,
                used: now,
                valid: true,
                querying: false,
            },
        );
        match old {
            Some(State::Pending { queue, .. }) => queue,
            _ => VecDeque::new(),
        }
    }

    /// Learns `value` for `key` from traffic (the sender of an ARP request
    /// or NS, as the host stack does): updates an entry that exists,
    /// resolving a pending one, but only creates one when `create`.
    pub fn learn(&mut self, key: K, value: V, now: Instant, create: bool) -> VecDeque<P> {
        let known = self.entries.contains_key(&key);
        if known || (create && self.entries.len() < self.cfg.max_entries) {
            self.resolve(key, value, now)
        } else {
            VecDeque::new()
        }
    }

    /// Abandons resolution of `key` (the query failed): a pending entry is
    /// removed and its packets returned to be dropped. A resolved entry
    /// whose refresh failed keeps its old value.
    pub fn fail(&mut self, key: &K) -> Vec<P> {
        match self.entries.get_mut(key) {
            Some(State::Pending { .. }) => match self.entries.remove(key) {
                Some(State::Pending { queue, .. }) => queue.into(),
                _ => Vec::new(),
            },
            Some(State::Resolved { querying, .. }) => {
                *querying = false;
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    /// Removes `key`, returning any queued packets.
    pub fn remove(&mut self, key: &K) -> Vec<P> {
        match self.entries.remove(key) {
            Some(State::Pending { queue, .. }) => queue.into(),
            _ => Vec::new(),
        }
    }

    /// Light flush: every resolved entry stays usable but is refreshed on
    /// its next use (Linux `ipoib_mark_paths_invalid`).
    pub fn invalidate_all(&mut self) {
        for state in self.entries.values_mut() {
            if let State::Resolved { valid, .. } = state {
                *valid = false;
            }
        }
    }

    /// Heavy flush: everything goes, queued packets are returned to be
    /// dropped.
    pub fn clear(&mut self) -> Vec<P> {
        let mut dropped = Vec::new();
        for (_, state) in self.entries.drain() {
            if let State::Pending { queue, .. } = state {
                dropped.extend(queue);
            }
        }
        dropped
    }

    /// Runs the timers: retries due queries, gives up on keys whose
    /// attempts are spent, and ages out idle entries. Events go to `out`.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Event<K, P>>) {
        let cfg = self.cfg;
        let mut gone = Vec::new();
        for (key, state) in &mut self.entries {
            match state {
                State::Pending { sent, next, .. } if now >= *next => {
                    if *sent >= cfg.attempts {
                        gone.push((*key, true));
                    } else {
                        *sent += 1;
                        *next = now + cfg.retry_interval;
                        out.push(Event::Retry(*key));
                    }
                }
                State::Resolved { used, .. } => {
                    if cfg
                        .idle_timeout
                        .is_some_and(|t| now.saturating_duration_since(*used) >= t)
                    {
                        gone.push((*key, false));
                    }
                }
                State::Pending { .. } => {}
            }
        }
        for (key, failed) in gone {
            let dropped = self.remove(&key);
            out.push(if failed {
                Event::Unreachable(key, dropped)
            } else {
                Event::Expired(key)
            });
        }
    }

    /// The earliest instant at which [`Cache::poll`] has work, for the
    /// event loop's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|s| match s {
                State::Pending { next, .. } => Some(*next),
                State::Resolved { used, .. } => self.cfg.idle_timeout.map(|t| *used + t),
            })
            .min()
    }

    /// A snapshot of every entry.
    pub fn entries(&self, now: Instant) -> Vec<EntryInfo<K, V>> {
        self.entries
            .iter()
            .map(|(key, s)| match s {
                State::Pending { queue, next, .. } => EntryInfo {
                    key: *key,
                    value: None,
                    queued: queue.len(),
                    age: next
                        .checked_sub(self.cfg.retry_interval)
                        .map_or(Duration::ZERO, |asked| now.saturating_duration_since(asked)),
                    valid: false,
                },
                State::Resolved {
                    value, used, valid, ..
                } => EntryInfo {
                    key: *key,
                    value: Some(*value),
                    queued: 0,
                    age: now.saturating_duration_since(*used),
                    valid: *valid,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Neigh = Cache<u32, char, &'static str>;

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn queues_three_then_drops_and_delivers_in_order() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config::PATHS);
        assert_eq!(c.lookup(7, "a", t0), Lookup::Queued { start: true });
        assert_eq!(c.lookup(7, "b", t0), Lookup::Queued { start: false });
        assert_eq!(c.lookup(7, "c", t0), Lookup::Queued { start: false });
        assert_eq!(c.lookup(7, "d", t0), Lookup::QueueFull("d"));
        assert_eq!(c.resolve(7, 'x', t0), ["a", "b", "c"]);
        assert_eq!(
            c.lookup(7, "e", t0),
            Lookup::Ready {
                value: 'x',
                packet: "e",
                refresh: false
            }
        );
    }

    #[test]
    fn retries_then_gives_up_with_the_queued_packets() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config::NEIGHBOURS);
        let mut ev = Vec::new();
        c.lookup(1, "p", t0);
        c.poll(secs(t0, 0), &mut ev);
        assert!(ev.is_empty(), "nothing due yet");
        c.poll(secs(t0, 1), &mut ev);
        c.poll(secs(t0, 2), &mut ev);
        assert_eq!(ev, [Event::Retry(1), Event::Retry(1)]);
        ev.clear();
        c.poll(secs(t0, 3), &mut ev);
        assert_eq!(ev, [Event::Unreachable(1, vec!["p"])]);
        assert!(c.is_empty());
        // The next packet starts a fresh attempt.
        assert_eq!(
            c.lookup(1, "q", secs(t0, 4)),
            Lookup::Queued { start: true }
        );
    }

    #[test]
    fn ageing_counts_from_the_last_use() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config::NEIGHBOURS);
        let mut ev = Vec::new();
        c.resolve(5, 'n', t0);
        assert!(matches!(
            c.lookup(5, "u", secs(t0, 50)),
            Lookup::Ready { .. }
        ));
        c.poll(secs(t0, 100), &mut ev);
        assert!(ev.is_empty(), "used at 50 s, so alive at 100 s");
        assert_eq!(c.next_deadline(), Some(secs(t0, 110)));
        c.poll(secs(t0, 110), &mut ev);
        assert_eq!(ev, [Event::Expired(5)]);
        // Paths never age.
        let mut p = Neigh::new(Config::PATHS);
        p.resolve(5, 'p', t0);
        p.poll(secs(t0, 100_000), &mut ev);
        assert_eq!(p.peek(&5), Some('p'));
    }

    #[test]
    fn light_flush_refreshes_once_and_keeps_sending() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config::PATHS);
        c.resolve(9, 'a', t0);
        c.invalidate_all();
        let first = c.lookup(9, "1", t0);
        assert_eq!(
            first,
            Lookup::Ready {
                value: 'a',
                packet: "1",
                refresh: true
            }
        );
        assert!(matches!(
            c.lookup(9, "2", t0),
            Lookup::Ready { refresh: false, .. }
        ));
        // A failed refresh keeps the old value; a later use asks again.
        assert!(c.fail(&9).is_empty());
        assert!(matches!(
            c.lookup(9, "3", t0),
            Lookup::Ready { refresh: true, .. }
        ));
        c.resolve(9, 'b', t0);
        assert!(matches!(
            c.lookup(9, "4", t0),
            Lookup::Ready {
                value: 'b',
                refresh: false,
                ..
            }
        ));
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config {
            max_entries: 2,
            ..Config::NEIGHBOURS
        });
        c.learn(1, 'a', t0, true);
        c.learn(2, 'b', t0, true);
        c.learn(3, 'c', t0, true);
        assert_eq!(c.len(), 2, "a third key is refused");
        assert_eq!(c.lookup(4, "p", t0), Lookup::QueueFull("p"));
        assert!(c.resolve(5, 'e', t0).is_empty());
        assert_eq!(c.peek(&5), None);
        // Known keys still update, and ageing makes room.
        c.learn(1, 'z', t0, true);
        assert_eq!(c.peek(&1), Some('z'));
        let mut ev = Vec::new();
        c.poll(t0 + Duration::from_secs(60), &mut ev);
        assert_eq!(c.len(), 0);
        assert_eq!(c.lookup(4, "p", t0), Lookup::Queued { start: true });
    }

    #[test]
    fn heavy_flush_and_learning() {
        let t0 = Instant::now();
        let mut c = Neigh::new(Config::NEIGHBOURS);
        c.lookup(1, "a", t0);
        c.resolve(2, 'b', t0);
        assert_eq!(c.clear(), ["a"]);
        assert!(c.is_empty());
        assert!(c.learn(3, 'c', t0, false).is_empty());
        assert_eq!(c.peek(&3), None, "not created without create");
        c.lookup(3, "x", t0);
        assert_eq!(
            c.learn(3, 'c', t0, false),
            ["x"],
            "a pending entry is resolved"
        );
        c.learn(4, 'd', t0, true);
        assert_eq!(c.peek(&4), Some('d'));
        let snap = c.entries(secs(t0, 2));
        assert_eq!(snap.len(), 2);
        assert!(
            snap.iter()
                .all(|e| e.valid && e.age == Duration::from_secs(2))
        );
    }
}
