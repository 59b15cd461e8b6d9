//! Login throttling: failures counted per operator name and per client address in a sliding
//! window, in memory. Enough failures lock the key for a while (doubling with each lock, capped);
//! a locked key is refused before any password is verified, so a locked name costs an attacker's
//! request no argon2 run. Pure logic over an injected clock: no I/O, unit-tested below.
//!
//! Attempts in flight count against the limit too: a burst of concurrent guesses cannot slip
//! past the limit while the first ones are still being verified.
//!
//! The maps are bounded: at the cap, entries that no longer matter are purged, then the least
//! recently used unlocked ones are evicted, so a flood of random names cannot grow them without
//! limit nor push out a lock (a locked entry goes only when nothing else is left).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// When a key is locked, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Failures within `window` that lock the key.
    pub limit: usize,
    /// How long a failure counts; a key quiet for this long after its last lock is forgiven.
    pub window: Duration,
    /// The first lock; each further lock while the key is remembered doubles it.
    pub first_lock: Duration,
    /// The longest lock.
    pub max_lock: Duration,
}

impl Rule {
    fn lock_for(&self, strikes: u32) -> Duration {
        let doubled = self
            .first_lock
            .saturating_mul(1u32 << strikes.saturating_sub(1).min(20));
        doubled.min(self.max_lock)
    }
}

/// Per operator name: five failures in 15 minutes lock the name for a minute, then 2, 4, 8 and
/// at most 15 minutes. A locked name refuses even its right password until the lock ends.
pub const PER_NAME: Rule = Rule {
    limit: 5,
    window: Duration::from_secs(15 * 60),
    first_lock: Duration::from_secs(60),
    max_lock: Duration::from_secs(15 * 60),
};

/// Per client address (IPv6 by /64): ten failures in 15 minutes, across names, lock the client
/// the same way. Higher than per name so that one mistyped name does not lock an office out,
/// low enough that spraying many names from one address gets few guesses.
pub const PER_CLIENT: Rule = Rule {
    limit: 10,
    window: Duration::from_secs(15 * 60),
    first_lock: Duration::from_secs(60),
    max_lock: Duration::from_secs(15 * 60),
};

/// Keys remembered per map (names, clients): about 2 MB at most.
pub const MAX_ENTRIES: usize = 10_000;

/// Names longer than this are counted (and logged, audited) by their first this many chars.
pub const NAME_CHARS: usize = 64;

#[derive(Debug)]
struct Entry {
    /// Failures within the window, oldest first (at most `limit`: reaching it locks and clears).
    failures: VecDeque<Instant>,
    /// Attempts being verified now.
    pending: u32,
    /// Locks so far, while remembered.
    strikes: u32,
    locked_until: Option<Instant>,
    /// A refusal under the current lock was already reported (audited once per lock).
    reported: bool,
    /// Last attempt or failure: the least recently used go first.
    used: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: VecDeque::new(),
            pending: 0,
            strikes: 0,
            locked_until: None,
            reported: false,
            used: now,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|t| t > now)
    }

    fn prune(&mut self, now: Instant, rule: &Rule) {
        while self
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= rule.window)
        {
            self.failures.pop_front();
        }
    }

    /// Nothing left to remember: no attempt in flight, no failure in the window, and a window of
    /// quiet since its last lock ended (which also forgives its strikes).
    fn forgotten(&self, now: Instant, rule: &Rule) -> bool {
        let last = self.failures.back().copied().into_iter();
        let quiet_since = last.chain(self.locked_until).max();
        self.pending == 0
            && quiet_since.is_none_or(|t| now.saturating_duration_since(t) >= rule.window)
    }
}

/// Why an attempt is refused before verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// Seconds until an attempt may succeed (at least 1): the `Retry-After` value.
    pub retry_after_secs: u64,
    /// The first refusal under this lock (the one worth an audit row).
    pub first: bool,
}

/// Failure counters for one kind of key.
#[derive(Debug)]
struct Counters<K> {
    rule: Rule,
    cap: usize,
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Counters<K> {
    fn new(rule: Rule, cap: usize) -> Counters<K> {
        Counters {
            rule,
            cap: cap.max(1),
            entries: HashMap::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Refused while locked, or while the attempts in flight would already reach the limit.
    fn check(&mut self, key: &K, now: Instant) -> Result<(), Locked> {
        let rule = self.rule;
        let Some(e) = self.entries.get_mut(key) else {
            return Ok(());
        };
        if let Some(until) = e.locked_until.filter(|t| *t > now) {
            let first = !e.reported;
            e.reported = true;
            return Err(Locked {
                retry_after_secs: ceil_secs(until - now),
                first,
            });
        }
        e.prune(now, &rule);
        if e.failures.len() + e.pending as usize >= rule.limit {
            // Only attempts in flight can get here (reaching the limit locks): their outcome
            // is a moment away.
            return Err(Locked {
                retry_after_secs: 1,
                first: false,
            });
        }
        Ok(())
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut Entry {
        if !self.entries.contains_key(key) {
            self.make_room(now);
        }
        let rule = self.rule;
        let e = self
            .entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        if e.forgotten(now, &rule) {
            let pending = e.pending;
            *e = Entry::new(now);
            e.pending = pending;
        }
        e.used = now;
        e
    }

    fn begin(&mut self, key: &K, now: Instant) {
        self.entry(key, now).pending += 1;
    }

    /// An attempt that ended without a verdict (the pool was busy, the client went away).
    fn release(&mut self, key: &K, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pending = e.pending.saturating_sub(1);
            if e.forgotten(now, &self.rule) {
                self.entries.remove(key);
            }
        }
    }

    /// A failed attempt; returns the lock it started, if any.
    fn fail(&mut self, key: &K, now: Instant) -> Option<Duration> {
        let rule = self.rule;
        let e = self.entry(key, now);
        e.pending = e.pending.saturating_sub(1);
        e.prune(now, &rule);
        e.failures.push_back(now);
        if e.failures.len() < rule.limit {
            return None;
        }
        e.strikes = e.strikes.saturating_add(1);
        let lock = rule.lock_for(e.strikes);
        e.locked_until = Some(now + lock);
        e.reported = false;
        e.failures.clear();
        Some(lock)
    }

    /// A successful attempt: the key starts afresh (failures, strikes and lock forgotten).
    fn reset(&mut self, key: &K, now: Instant) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        e.pending = e.pending.saturating_sub(1);
        if e.pending == 0 {
            self.entries.remove(key);
        } else {
            let pending = e.pending;
            *e = Entry::new(now);
            e.pending = pending;
        }
    }

    /// Drops every entry that is forgotten.
    fn purge(&mut self, now: Instant) {
        let rule = self.rule;
        self.entries.retain(|_, e| !e.forgotten(now, &rule));
    }

    /// At the cap: purge what is forgotten; if still full, evict the least recently used tenth,
    /// unlocked and idle entries before locked or busy ones. One pass over the map per tenth of
    /// the cap inserted, so a flood pays a constant amount per attempt.
    fn make_room(&mut self, now: Instant) {
        if self.entries.len() < self.cap {
            return;
        }
        self.purge(now);
        if self.entries.len() < self.cap {
            return;
        }
        let mut ranked: Vec<((bool, Instant), K)> = self
            .entries
            .iter()
            .map(|(k, e)| ((e.locked(now) || e.pending > 0, e.used), k.clone()))
            .collect();
        let evict = (self.cap / 10).max(1).min(ranked.len());
        ranked.select_nth_unstable_by_key(evict - 1, |(rank, _)| *rank);
        for (_, k) in ranked.into_iter().take(evict) {
            self.entries.remove(&k);
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Which counter refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Name,
    Client,
}

impl By {
    pub fn as_str(self) -> &'static str {
        match self {
            By::Name => "name",
            By::Client => "client",
        }
    }
}

/// An attempt refused before verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub by: By,
    pub lock: Locked,
}

/// What a failure started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locks {
    pub name: Option<Duration>,
    pub client: Option<Duration>,
}

/// The console's login throttle: per name and per client.
#[derive(Debug)]
pub struct LoginThrottle {
    names: Counters<String>,
    clients: Counters<IpAddr>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::new(PER_NAME, PER_CLIENT, MAX_ENTRIES)
    }
}

impl LoginThrottle {
    pub fn new(per_name: Rule, per_client: Rule, cap: usize) -> LoginThrottle {
        LoginThrottle {
            names: Counters::new(per_name, cap),
            clients: Counters::new(per_client, cap),
        }
    }

    /// Before verifying: refused if the name or the client is locked (the longer wait is
    /// reported); otherwise the attempt is counted as in flight until its outcome is reported
    /// with [`Self::failed`], [`Self::succeeded`] or [`Self::abandoned`].
    pub fn begin(&mut self, name: &str, client: IpAddr, now: Instant) -> Result<(), Throttled> {
        let name = name_key(name);
        let client = client_key(client);
        let by_name = self.names.check(&name, now).err();
        let by_client = self.clients.check(&client, now).err();
        let refusal = match (by_name, by_client) {
            // Both: the longer wait, reported as new if either lock is.
            (Some(n), Some(c)) => {
                let first = n.first || c.first;
                if c.retry_after_secs > n.retry_after_secs {
                    Some((By::Client, Locked { first, ..c }))
                } else {
                    Some((By::Name, Locked { first, ..n }))
                }
            }
            (Some(n), None) => Some((By::Name, n)),
            (None, Some(c)) => Some((By::Client, c)),
            (None, None) => None,
        };
        if let Some((by, lock)) = refusal {
            return Err(Throttled { by, lock });
        }
        self.names.begin(&name, now);
        self.clients.begin(&client, now);
        Ok(())
    }

    pub fn failed(&mut self, name: &str, client: IpAddr, now: Instant) -> Locks {
        Locks {
            name: self.names.fail(&name_key(name), now),
            client: self.clients.fail(&client_key(client), now),
        }
    }

    /// The name starts afresh; the client keeps its failures (one account's password must not
    /// wipe out a client's guesses at others).
    pub fn succeeded(&mut self, name: &str, client: IpAddr, now: Instant) {
        self.names.reset(&name_key(name), now);
        // Its own charge is dropped: a success is not a failure.
        self.clients.release(&client_key(client), now);
    }

    /// No verdict (the verifier was busy, the client went away): nothing counted.
    pub fn abandoned(&mut self, name: &str, client: IpAddr, now: Instant) {
        self.names.release(&name_key(name), now);
        self.clients.release(&client_key(client), now);
    }

    /// Drops what no longer matters (run now and then, so quiet times give memory back).
    pub fn purge(&mut self, now: Instant) {
        self.names.purge(now);
        self.clients.purge(now);
    }

    /// Entries held: (names, clients).
    #[cfg(test)]
    pub fn sizes(&self) -> (usize, usize) {
        (self.names.len(), self.clients.len())
    }
}

/// The name as counted: its first [`NAME_CHARS`] chars.
pub fn name_key(name: &str) -> String {
    name.chars().take(NAME_CHARS).collect()
}

/// The client as counted: an IPv4 address (mapped ones included) as is, an IPv6 address by its
/// /64, since one host usually holds a whole /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    fn throttle() -> LoginThrottle {
        LoginThrottle::default()
    }

    /// One whole failed attempt.
    fn fail(t: &mut LoginThrottle, name: &str, client: IpAddr, now: Instant) -> Locks {
        t.begin(name, client, now).expect("not throttled");
        t.failed(name, client, now)
    }

    #[test]
    fn five_failures_lock_the_name_and_even_the_right_password_waits() {
        let mut t = throttle();
        let t0 = Instant::now();
        for i in 0..4 {
            let locks = fail(&mut t, "admin", A, t0 + Duration::from_secs(i));
            assert_eq!(locks, Locks::default(), "failure {i} locks nothing");
        }
        let locks = fail(&mut t, "admin", A, t0 + Duration::from_secs(4));
        assert_eq!(locks.name, Some(Duration::from_secs(60)));
        assert_eq!(locks.client, None);
        // Refused before verification, whatever the password; from another client too.
        let at = t0 + Duration::from_millis(4_500);
        let refused = t.begin("admin", A, at).unwrap_err();
        assert_eq!(refused.by, By::Name);
        assert_eq!(
            refused.lock,
            Locked {
                retry_after_secs: 60,
                first: true
            }
        );
        let again = t
            .begin("admin", B, t0 + Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(again.lock.retry_after_secs, 34, "Retry-After counts down");
        assert!(!again.lock.first, "audited once per lock");
        // Another name from the same client is not locked.
        assert!(t.begin("viewer", A, at).is_ok());
        // Once the lock has ended, attempts are verified again.
        assert!(t.begin("admin", A, t0 + Duration::from_secs(64)).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_a_second() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(59_001)), 60);
        assert_eq!(ceil_secs(Duration::from_secs(60)), 60);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }

    #[test]
    fn failures_slide_out_of_the_window() {
        let mut t = throttle();
        let t0 = Instant::now();
        for i in 0..4 {
            fail(&mut t, "admin", A, t0 + Duration::from_secs(i));
        }
        // Fifteen minutes on, those four no longer count: four more lock nothing.
        let later = t0 + PER_NAME.window + Duration::from_secs(10);
        for i in 0..4 {
            let locks = fail(&mut t, "admin", A, later + Duration::from_secs(i));
            assert_eq!(locks.name, None);
        }
        assert_eq!(
            fail(&mut t, "admin", A, later + Duration::from_secs(5)).name,
            Some(Duration::from_secs(60))
        );
    }

    /// A throttle whose client counter never locks, to look at names alone.
    fn names_only() -> LoginThrottle {
        let never = Rule {
            limit: usize::MAX,
            ..PER_CLIENT
        };
        LoginThrottle::new(PER_NAME, never, MAX_ENTRIES)
    }

    #[test]
    fn each_lock_doubles_up_to_the_cap_and_quiet_forgives() {
        let mut t = names_only();
        let mut now = Instant::now();
        let round = |t: &mut LoginThrottle, now: Instant| {
            let mut lock = None;
            for _ in 0..PER_NAME.limit {
                lock = fail(t, "admin", A, now).name.or(lock);
            }
            lock.expect("the fifth failure locks")
        };
        let mut minutes = Vec::new();
        for _ in 0..6 {
            let lock = round(&mut t, now);
            minutes.push(lock.as_secs() / 60);
            // Straight after the lock ends, five more.
            now += lock;
        }
        assert_eq!(minutes, [1, 2, 4, 8, 15, 15]);
        // A window of quiet after the last lock: the next five lock for a minute again.
        now += PER_NAME.window;
        assert_eq!(round(&mut t, now), Duration::from_secs(60));
    }

    #[test]
    fn a_success_resets_the_name_but_not_the_client() {
        let mut t = throttle();
        let t0 = Instant::now();
        for _ in 0..4 {
            fail(&mut t, "admin", A, t0);
        }
        t.begin("admin", A, t0).unwrap();
        t.succeeded("admin", A, t0);
        // Four more failures after the success lock nothing: the name starts afresh.
        for _ in 0..4 {
            assert_eq!(fail(&mut t, "admin", A, t0).name, None);
        }
        // The client kept its eight failures: two more (any names) lock it.
        assert_eq!(fail(&mut t, "other", A, t0).client, None);
        assert_eq!(
            fail(&mut t, "third", A, t0).client,
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_client_spraying_names_is_locked_for_every_name() {
        let mut t = throttle();
        let t0 = Instant::now();
        for i in 0..PER_CLIENT.limit {
            let locks = fail(&mut t, &format!("name-{i}"), A, t0);
            assert_eq!(locks.name, None);
            assert_eq!(
                locks.client.is_some(),
                i + 1 == PER_CLIENT.limit,
                "failure {i}"
            );
        }
        let refused = t.begin("admin", A, t0).unwrap_err();
        assert_eq!(refused.by, By::Client);
        assert_eq!(refused.lock.retry_after_secs, 60);
        // Another client may still log in as anyone.
        assert!(t.begin("admin", B, t0).is_ok());
    }

    #[test]
    fn the_longer_of_two_locks_is_reported() {
        let long_client_lock = Rule {
            first_lock: Duration::from_secs(300),
            ..PER_CLIENT
        };
        let mut t = LoginThrottle::new(PER_NAME, long_client_lock, MAX_ENTRIES);
        let t0 = Instant::now();
        for i in 0..5 {
            fail(&mut t, &format!("n{i}"), A, t0);
        }
        // The tenth failure from A is admin's fifth: both locked, the client for longer.
        let at = t0 + Duration::from_secs(10);
        let mut locks = Locks::default();
        for _ in 0..5 {
            locks = fail(&mut t, "admin", A, at);
        }
        assert_eq!(locks.name, Some(Duration::from_secs(60)));
        assert_eq!(locks.client, Some(Duration::from_secs(300)));
        let r = t
            .begin("admin", A, at + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!((r.by, r.lock.retry_after_secs), (By::Client, 290));
        assert!(r.lock.first, "both locks are new: reported once");
        // From another client only the name's lock is left, already reported.
        let r = t
            .begin("admin", B, at + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!((r.by, r.lock.retry_after_secs), (By::Name, 50));
        assert!(!r.lock.first);
    }

    #[test]
    fn attempts_in_flight_count_against_the_limit() {
        let mut t = throttle();
        let t0 = Instant::now();
        for _ in 0..PER_NAME.limit {
            t.begin("admin", A, t0).unwrap();
        }
        // Five guesses being verified: a sixth waits for their outcome.
        let r = t.begin("admin", B, t0).unwrap_err();
        assert_eq!((r.by, r.lock.retry_after_secs), (By::Name, 1));
        // One ends without a verdict: room for one more.
        t.abandoned("admin", A, t0);
        assert!(t.begin("admin", B, t0).is_ok());
        // They all fail: the name is locked once, for a minute.
        let mut locks = Vec::new();
        for c in [A, A, A, A, B] {
            locks.extend(t.failed("admin", c, t0).name);
        }
        assert_eq!(locks, [Duration::from_secs(60)]);
    }

    #[test]
    fn the_maps_stay_bounded_and_a_flood_does_not_push_out_a_lock() {
        let rule = Rule {
            limit: 2,
            ..PER_NAME
        };
        let client_rule = Rule {
            limit: usize::MAX,
            ..PER_CLIENT
        };
        let mut t = LoginThrottle::new(rule, client_rule, 100);
        let t0 = Instant::now();
        fail(&mut t, "admin", A, t0);
        assert!(fail(&mut t, "admin", A, t0).name.is_some());
        for i in 0..10_000u32 {
            let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            fail(
                &mut t,
                &format!("random-{i}"),
                client,
                t0 + Duration::from_millis(u64::from(i)),
            );
            let (names, clients) = t.sizes();
            assert!(
                names <= 100 && clients <= 100,
                "{names} names, {clients} clients"
            );
        }
        assert_eq!(
            t.begin("admin", B, t0 + Duration::from_secs(20))
                .unwrap_err()
                .by,
            By::Name,
            "the lock outlived the flood"
        );
        // An hour on, everything is forgotten and purged.
        t.purge(t0 + Duration::from_secs(3600));
        assert_eq!(t.sizes(), (0, 0));
    }

    #[test]
    fn long_names_and_ipv6_hosts_share_a_counter() {
        let long = "a".repeat(500);
        assert_eq!(name_key(&long).chars().count(), NAME_CHARS);
        let one: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let other: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(client_key(one), client_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), A);
        assert_eq!(client_key(A), A);
    }
}
