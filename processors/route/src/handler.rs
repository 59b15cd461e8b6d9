//! Pure routing logic: smooth weighted round robin (nginx's algorithm) inside the first priority
//! group that has an available provider, and the expiry policy.

use herald_core::config::ProviderConfig;

#[derive(Debug, Clone)]
struct Peer {
    code: String,
    kind: String,
    priority: u32,
    weight: i64,
    current: i64,
}

/// Provider choice for one channel.
#[derive(Debug, Clone)]
pub struct Balancer {
    peers: Vec<Peer>,
}

impl Balancer {
    pub fn new(providers: &[&ProviderConfig]) -> Balancer {
        Balancer {
            peers: providers
                .iter()
                .map(|p| Peer {
                    code: p.code.clone(),
                    kind: p.kind.clone(),
                    priority: p.priority,
                    weight: i64::from(p.weight.max(1)),
                    current: 0,
                })
                .collect(),
        }
    }

    /// The next provider `(code, kind)`, skipping those `available` rejects (open breakers).
    /// Lower priority groups are used only when no provider of a better group is available.
    pub fn pick(&mut self, available: impl Fn(&str) -> bool) -> Option<(String, String)> {
        let best = self
            .peers
            .iter()
            .filter(|p| available(&p.code))
            .map(|p| p.priority)
            .min()?;
        let mut total = 0;
        let mut chosen: Option<(usize, i64)> = None;
        for (i, p) in self.peers.iter_mut().enumerate() {
            if p.priority != best || !available(&p.code) {
                continue;
            }
            p.current += p.weight;
            total += p.weight;
            if chosen.is_none_or(|(_, cur)| p.current > cur) {
                chosen = Some((i, p.current));
            }
        }
        let (c, _) = chosen?;
        self.peers[c].current -= total;
        let peer = &self.peers[c];
        Some((peer.code.clone(), peer.kind.clone()))
    }
}

/// True when a message must not be sent any more.
pub fn expired(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_some_and(|e| e <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(code: &str, priority: u32, weight: u32) -> ProviderConfig {
        ProviderConfig {
            code: code.into(),
            kind: "webhook".into(),
            channel: Some(herald_schemas::Channel::Webhook),
            endpoint: String::new(),
            priority,
            weight,
            rate_limit_per_sec: None,
            batch_max: None,
            timeout_ms: 1000,
            from: None,
            tls: None,
            credentials_env: Default::default(),
            credentials: Default::default(),
            settings: Default::default(),
            breaker: Default::default(),
        }
    }

    #[test]
    fn smooth_weighted_round_robin_matches_nginx() {
        let (a, b, c) = (p("a", 0, 5), p("b", 0, 1), p("c", 0, 1));
        let mut bal = Balancer::new(&[&a, &b, &c]);
        let seq: Vec<String> = (0..7).map(|_| bal.pick(|_| true).unwrap().0).collect();
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(seq, ["a", "a", "b", "a", "c", "a", "a"]);
    }

    #[test]
    fn weights_split_traffic_and_unavailable_providers_are_skipped() {
        let (a, b, backup) = (p("a", 0, 3), p("b", 0, 1), p("backup", 1, 1));
        let mut bal = Balancer::new(&[&a, &b, &backup]);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..4000 {
            *counts.entry(bal.pick(|_| true).unwrap().0).or_insert(0) += 1;
        }
        assert_eq!(counts["a"], 3000);
        assert_eq!(counts["b"], 1000);
        assert!(!counts.contains_key("backup"));
        assert_eq!(bal.pick(|c| c != "a").unwrap().0, "b");
        assert_eq!(bal.pick(|c| c == "backup").unwrap().0, "backup");
        assert!(bal.pick(|_| false).is_none());
    }

    #[test]
    fn expiry() {
        assert!(expired(Some(5), 5));
        assert!(!expired(Some(6), 5));
        assert!(!expired(None, 5));
    }
}
