//! The `Server-Timing` response header (W3C Server Timing) of the lifecycle routes: where a
//! create, wake, fork or hibernate spent its time, one metric per phase, in milliseconds.
//!
//! Layout: `slot;dur=1.2, disk;dur=40.1, runsc;dur=252.0, total;dur=370.5`. Names are
//! fixed lowercase words chosen by the server (never anything from a request); `dur` is
//! milliseconds, plain decimal. `total` is the operation's wall time; phases that ran
//! concurrently (a fork's children) each count their own time, so the phases may add up to
//! more than `total`, and what no phase names adds up to less.
//!
//! [`parse`] reads what [`format`] writes, for clients such as the benchmark, and fails
//! closed: one malformed or duplicate metric, a character outside the layout, a `dur` that
//! is not a plain number, and the whole header is refused (`None`).

/// The header's name (lowercase, as HTTP/2 sends it).
pub const HEADER: &str = "server-timing";
/// The metric holding the operation's wall time.
pub const TOTAL: &str = "total";

/// Longest header [`parse`] reads.
pub const MAX_LEN: usize = 4096;
/// Most metrics [`parse`] reads.
pub const MAX_METRICS: usize = 64;
/// Longest metric or parameter name.
const MAX_NAME: usize = 32;
/// Longest `dur` value, in characters.
const MAX_NUMBER: usize = 16;

/// Whether `name` can be a metric name here: 1 to 32 of `a-z`, `0-9`, `_`, `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The header value for `metrics` (name, milliseconds), in order. A name that is not
/// [`valid_name`], or a duration that is not finite and non-negative, is left out.
pub fn format<'a>(metrics: impl IntoIterator<Item = (&'a str, f64)>) -> String {
    metrics
        .into_iter()
        .filter(|(name, ms)| valid_name(name) && ms.is_finite() && *ms >= 0.0)
        .map(|(name, ms)| format!("{name};dur={ms:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The metrics (name, milliseconds) of a header [`format`] wrote, in order; `None` if any
/// part of it is not in that layout (see the module docs). Parameters other than `dur`
/// are skipped if their value is a plain word; every metric must carry one `dur`.
pub fn parse(value: &str) -> Option<Vec<(String, f64)>> {
    if value.len() > MAX_LEN {
        return None;
    }
    let mut out: Vec<(String, f64)> = Vec::new();
    for entry in value.split(',') {
        if out.len() == MAX_METRICS {
            return None;
        }
        let mut parts = entry.split(';').map(|p| p.trim_matches(' '));
        let name = parts.next()?;
        if !valid_name(name) || out.iter().any(|(n, _)| n == name) {
            return None;
        }
        let mut dur = None;
        for param in parts {
            let (key, v) = param.split_once('=')?;
            let (key, v) = (key.trim_matches(' '), v.trim_matches(' '));
            if !valid_name(key) {
                return None;
            }
            if key == "dur" {
                if dur.is_some() {
                    return None;
                }
                dur = Some(number(v)?);
            } else if !valid_name(v) {
                return None;
            }
        }
        out.push((name.to_string(), dur?));
    }
    Some(out)
}

/// A plain decimal number (`12`, `12.5`): no sign, exponent, or `inf`/`NaN`.
fn number(v: &str) -> Option<f64> {
    let digits = v.bytes().filter(u8::is_ascii_digit).count();
    let dots = v.bytes().filter(|b| *b == b'.').count();
    if v.len() > MAX_NUMBER || digits == 0 || dots > 1 || digits + dots != v.len() {
        return None;
    }
    v.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_in_order_with_one_decimal() {
        assert_eq!(
            format([("slot", 1.23), ("runsc", 252.0), (TOTAL, 370.46)]),
            "slot;dur=1.2, runsc;dur=252.0, total;dur=370.5"
        );
        assert_eq!(format([]), "");
        // Nothing that would break the layout gets in.
        assert_eq!(
            format([("Bad Name", 1.0), ("ok", f64::NAN), ("x", -1.0), ("y", 2.0)]),
            "y;dur=2.0"
        );
    }

    #[test]
    fn parses_what_it_formats_and_skips_plain_params() {
        assert_eq!(
            parse("slot;dur=1.2, runsc;dur=252, total;dur=370.5").unwrap(),
            vec![
                ("slot".to_string(), 1.2),
                ("runsc".to_string(), 252.0),
                ("total".to_string(), 370.5)
            ]
        );
        assert_eq!(
            parse("a;desc=word;dur=3").unwrap(),
            vec![("a".to_string(), 3.0)]
        );
    }

    #[test]
    fn refuses_junk() {
        for bad in [
            "",
            " ",
            ",",
            "a;dur=1,",
            "a",
            "a;dur=",
            "a;dur=1;dur=2",
            "a;dur=1, a;dur=2",
            "a;dur=-1",
            "a;dur=1e3",
            "a;dur=inf",
            "a;dur=NaN",
            "a;dur=1.2.3",
            "a;dur=.",
            "A;dur=1",
            "a;dur=1;desc=\"x, y\"",
            "a;dur=1;desc",
            "a b;dur=1",
            "a;dur=99999999999999999",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let many = (0..=MAX_METRICS)
            .map(|i| format!("m{i};dur=1"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(parse(&many), None);
    }

    proptest! {
        #[test]
        fn round_trips(metrics in proptest::collection::btree_map("[a-z][a-z0-9_-]{0,31}", 0.0f64..1e9, 1..20)) {
            let header = format(metrics.iter().map(|(n, v)| (n.as_str(), *v)));
            let back = parse(&header).expect("its own output parses");
            prop_assert_eq!(back.len(), metrics.len());
            for ((n, v), (bn, bv)) in metrics.iter().zip(&back) {
                prop_assert_eq!(n, bn);
                prop_assert!((v - bv).abs() <= 0.05 + v * 1e-12);
            }
        }

        #[test]
        fn fails_closed_outside_the_alphabet(s in ".{0,64}", junk in "[^a-z0-9_.;=, -]") {
            let mut s = s;
            let at = s.char_indices().map(|(i, _)| i).nth(s.chars().count() / 2).unwrap_or(s.len());
            s.insert_str(at, &junk);
            prop_assert_eq!(parse(&s), None);
        }

        #[test]
        fn what_it_accepts_is_well_formed(s in "[a-z0-9_.;=, -]{0,80}") {
            if let Some(metrics) = parse(&s) {
                prop_assert!(!metrics.is_empty());
                for (name, ms) in &metrics {
                    prop_assert!(valid_name(name));
                    prop_assert!(ms.is_finite() && *ms >= 0.0);
                }
                let again = format(metrics.iter().map(|(n, v)| (n.as_str(), *v)));
                prop_assert_eq!(parse(&again).map(|m| m.len()), Some(metrics.len()));
            }
        }
    }
}
