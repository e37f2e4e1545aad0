//! Failback round (`round.json`) from a hostile appliance; what parses must round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use snapshot::round::Round;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Round::parse(data, "fuzz") {
        let again = Round::parse(&r.to_bytes(), "fuzz").expect("a parsed round re-parses");
        assert_eq!(again, r, "round does not round-trip");
    }
});
