//! Sizes as people type them (`64K`, `1.5G`, `0x1000`) and as qemu prints them.

/// Binary suffixes, as qemu-img and qemu-io accept them: each letter is a power of 1024.
const SUFFIXES: [(char, u32); 7] = [
    ('b', 0),
    ('k', 10),
    ('m', 20),
    ('g', 30),
    ('t', 40),
    ('p', 50),
    ('e', 60),
];

/// Parses a byte count: decimal or `0x` hex, then an optional suffix B, K, M, G, T, P or E
/// (case-insensitive, powers of 1024). A decimal fraction is allowed when the result is a
/// whole number of bytes (`1.5K`), as qemu allows.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!("invalid size '{text}': expected a number with an optional suffix K, M, G, T, P or E (powers of 1024)")
    };
    let s = text.trim();
    let (number, shift) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() && !is_hex_digit_of(s, c) => {
            let lower = c.to_ascii_lowercase();
            let (_, shift) = SUFFIXES
                .iter()
                .find(|(l, _)| *l == lower)
                .ok_or_else(invalid)?;
            (&s[..s.len() - 1], *shift)
        }
        _ => (s, 0),
    };
    let too_large = || format!("invalid size '{text}': larger than 2^64 - 1 bytes");
    if let Some(hex) = number
        .strip_prefix("0x")
        .or_else(|| number.strip_prefix("0X"))
    {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        let value = u64::from_str_radix(hex, 16).map_err(|_| too_large())?;
        return value.checked_mul(1 << shift).ok_or_else(too_large);
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    // 19 fraction digits keep 10^digits and the products below inside u128.
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) || fraction.len() > 19 {
        return Err(invalid());
    }
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let unit = 1u128 << shift;
    let mut bytes = whole.checked_mul(unit).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        let numerator: u128 = fraction.parse().map_err(|_| invalid())?;
        let denominator = 10u128.pow(fraction.len() as u32);
        let scaled = numerator * unit;
        if !scaled.is_multiple_of(denominator) {
            return Err(format!(
                "invalid size '{text}': not a whole number of bytes"
            ));
        }
        bytes += scaled / denominator;
    }
    u64::try_from(bytes).map_err(|_| too_large())
}

/// `b` and `e` are suffixes but also hex digits: in `0x1b` the `b` is a digit.
fn is_hex_digit_of(s: &str, c: char) -> bool {
    let lower = s.to_ascii_lowercase();
    lower.starts_with("0x") && c.is_ascii_hexdigit()
}

/// A cluster size: a power of two from 4 KiB to 2 MiB.
pub fn parse_cluster_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    let min = 1u64 << crate::format::MIN_CLUSTER_BITS;
    let max = 1u64 << crate::format::MAX_CLUSTER_BITS;
    if !size.is_power_of_two() || !(min..=max).contains(&size) {
        return Err(format!(
            "invalid cluster size '{text}' ({size} bytes): must be a power of two from 4K to 2M"
        ));
    }
    Ok(size)
}

/// Formats a byte count the way qemu-img does (`size_to_str`): three significant digits
/// and a binary unit, switching to the next unit from 1000 on (`1000 B` is `0.977 KiB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes as f64 >= 1000.0 * (1u64 << (10 * unit)) as f64 {
        unit += 1;
    }
    let value = bytes as f64 / (1u64 << (10 * unit)) as f64;
    format!("{} {}", three_significant_digits(value), UNITS[unit])
}

/// C's `%0.3g`: three significant digits, trailing zeros dropped.
fn three_significant_digits(value: f64) -> String {
    if value == 0.0 {
        return "0".into();
    }
    // Rounding first tells whether 999.7 became 1.00e3.
    let scientific = format!("{value:.2e}");
    let exponent: i32 = scientific
        .split_once('e')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0);
    if !(-4..3).contains(&exponent) {
        let (mantissa, _) = scientific.split_once('e').unwrap_or((&scientific, ""));
        let sign = if exponent < 0 { '-' } else { '+' };
        return format!(
            "{}e{sign}{:02}",
            trim_fraction(mantissa),
            exponent.unsigned_abs()
        );
    }
    let decimals = (2 - exponent) as usize;
    trim_fraction(&format!("{value:.decimals$}")).to_string()
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// Formats a byte count the way qemu-io does (`cvtstr`): `10 bytes`, `4 KiB`, `1.500 KiB`.
pub fn io_size(value: f64) -> String {
    const UNITS: [&str; 6] = [" EiB", " PiB", " TiB", " GiB", " MiB", " KiB"];
    for (i, unit) in UNITS.iter().enumerate() {
        let scale = (1u64 << (10 * (6 - i))) as f64;
        if value >= scale {
            return without_zero_fraction(format!("{:.3}", value / scale), unit);
        }
    }
    without_zero_fraction(format!("{value:.6}"), " bytes")
}

/// qemu-io drops a fraction that starts with `.000`.
fn without_zero_fraction(number: String, unit: &str) -> String {
    match number.find(".000") {
        Some(i) => format!("{}{unit}", &number[..i]),
        None => format!("{number}{unit}"),
    }
}

/// The `-o` options of a command that takes only `cluster_size` (convert, measure).
pub fn cluster_size_option(options: &[String], command: &str) -> anyhow::Result<Option<u64>> {
    use anyhow::Context;
    let mut cluster_size = None;
    for item in options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("-o {item}: expected KEY=VALUE"))?;
        match key {
            "cluster_size" => {
                cluster_size =
                    Some(parse_cluster_size(value).map_err(|e| anyhow::anyhow!("-o {item}: {e}"))?);
            }
            _ => anyhow::bail!("-o {key}: unknown option; {command} takes cluster_size"),
        }
    }
    Ok(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("512b"), Ok(512));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x1b"), Ok(27));
        assert_eq!(parse_size("0x2M"), Ok(2 << 20));
    }

    #[test]
    fn malformed_or_huge_sizes_are_refused() {
        for bad in [
            "", "K", "12Q", "1.2.3", "-1", "1 K", "0x", "0xg", "1.5", "0.1K", "16E", "1e3",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_size("18446744073709551616").is_err());
    }

    #[test]
    fn cluster_sizes_must_be_powers_of_two_in_range() {
        assert_eq!(parse_cluster_size("64K"), Ok(65536));
        assert_eq!(parse_cluster_size("4K"), Ok(4096));
        assert_eq!(parse_cluster_size("2M"), Ok(2 << 20));
        assert!(parse_cluster_size("3K").is_err());
        assert!(parse_cluster_size("2K").is_err());
        assert!(parse_cluster_size("4M").is_err());
    }

    #[test]
    fn human_sizes_match_qemu_img() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "0.977 KiB");
        assert_eq!(human_size(331776), "324 KiB");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(1536 << 20), "1.5 GiB");
        assert_eq!(human_size(16 << 40), "16 TiB");
    }

    #[test]
    fn io_sizes_match_qemu_io() {
        assert_eq!(io_size(10.0), "10 bytes");
        assert_eq!(io_size(4096.0), "4 KiB");
        assert_eq!(io_size(1536.0), "1.500 KiB");
        assert_eq!(io_size(65536.0), "64 KiB");
    }
}
