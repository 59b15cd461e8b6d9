//! WeChat server verification signature (PROVIDERS.md §6): what the simulator answers the
//! platform's URL check with.

use sha1::{Digest, Sha1};

/// WeChat server verification: hex SHA1 of the sorted concatenation of token, timestamp, nonce.
pub fn wechat_server_signature(token: &str, timestamp: &str, nonce: &str) -> String {
    let mut parts = [token, timestamp, nonce];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_hex_sha1_of_the_sorted_parts() {
        let s = wechat_server_signature("b", "a", "c");
        assert_eq!(s.len(), 40);
        assert_eq!(s, wechat_server_signature("c", "b", "a"));
    }
}
