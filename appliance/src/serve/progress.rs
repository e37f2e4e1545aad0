//! The last progress report of each host's boot image (`/api/v1/progress`), kept in memory and
//! bounded by design: one record per host, a record at most [`RECORD_LIMIT`] bytes, reports only
//! for hosts the store knows (a `hosts/<host>/` directory or an open upload session), and at
//! most [`MAX_HOSTS`] records (the oldest report goes first). So `GET /api/v1/progress` answers
//! at most about `MAX_HOSTS x RECORD_LIMIT` (16 MiB), whatever clients send.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Largest report body accepted (the `starting` inventory line of a big server fits).
pub const RECORD_LIMIT: u64 = 16 << 10;
/// Hosts with a record at once.
pub const MAX_HOSTS: usize = 1024;

/// Host -> (arrival number, report).
type Records = BTreeMap<String, (u64, serde_json::Value)>;

#[derive(Default)]
pub struct Reports {
    /// The last arrival number given, and the records.
    map: Mutex<(u64, Records)>,
}

impl Reports {
    /// Keep `v` as `host`'s last report, dropping the oldest record when full.
    pub fn put(&self, host: &str, v: serde_json::Value) {
        let mut g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (seq, map) = &mut *g;
        *seq += 1;
        let n = *seq;
        map.insert(host.to_string(), (n, v));
        while map.len() > MAX_HOSTS {
            let oldest = map
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(h, _)| h.clone());
            match oldest {
                Some(h) => map.remove(&h),
                None => break,
            };
        }
    }

    /// The JSON array of the records whose host passes `may_read`, in host order.
    pub fn list(&self, may_read: &dyn Fn(&str) -> bool) -> Vec<u8> {
        let g = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v: Vec<&serde_json::Value> =
            g.1.iter()
                .filter(|(h, _)| may_read(h))
                .map(|(_, (_, v))| v)
                .collect();
        serde_json::to_vec(&v).unwrap_or_else(|_| b"[]".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_host_and_oldest_evicted() {
        let r = Reports::default();
        for i in 0..MAX_HOSTS + 10 {
            r.put(&format!("h{i}"), serde_json::json!({ "i": i }));
            r.put("h0", serde_json::json!({ "i": 0 }));
        }
        let v: Vec<serde_json::Value> = serde_json::from_slice(&r.list(&|_| true)).unwrap();
        assert_eq!(v.len(), MAX_HOSTS);
        // h0 was refreshed every time: kept; h1..h10 went.
        assert!(v.contains(&serde_json::json!({ "i": 0 })));
        assert!(!v.contains(&serde_json::json!({ "i": 1 })));
        let none: Vec<serde_json::Value> = serde_json::from_slice(&r.list(&|_| false)).unwrap();
        assert!(none.is_empty());
    }
}
