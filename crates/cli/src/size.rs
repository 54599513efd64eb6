//! Human-friendly byte sizes on the command line ("256M", "1GiB", "4096").

/// Parses a size: a number with an optional binary unit (K, M, G, T, each alone or with
/// "B" or "iB"; "B" alone is bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => format!("'{text}' is too large"),
            _ => format!("'{text}' is not a size (try 256M or 1G)"),
        })?;
    // Otherwise '1.5G' would read as 1 with the unknown unit '.5G'.
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "'{text}': a size is a whole number (no decimals): use a smaller unit, e.g. 1536M for 1.5G"
        ));
    }
    let unit = unit.trim().to_ascii_uppercase();
    let prefix = unit
        .strip_suffix("IB")
        .filter(|p| !p.is_empty())
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let shift = match prefix {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(format!(
                "'{text}': unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses a VM's RAM size, refusing at once (a usage error) one the VMM does not take.
pub fn parse_ram(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    ferry_vmm::memory::validate_ram_size(size).map_err(|e| e.to_string())?;
    Ok(size)
}

/// Parses a VM's accelerator memory size, refusing at once one the VMM does not take.
pub fn parse_accel_memory(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !size.is_multiple_of(ferry_abi::PAGE_SIZE) || size > ferry_vmm::vm::MAX_ACCEL_MEMORY {
        return Err(format!(
            "'{text}': accelerator memory is whole {} KiB pages, at most {} GiB",
            ferry_abi::PAGE_SIZE >> 10,
            ferry_vmm::vm::MAX_ACCEL_MEMORY >> 30
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_size("4KB"), Ok(4 << 10));
        assert_eq!(parse_size("512B"), Ok(512));
        // A unit once, not repeated.
        for bad in ["256BB", "1IBIB", "256MBB", "4KBIB", "3IB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for decimal in ["1.5G", "0,5M", "2.G"] {
            let error = parse_size(decimal).unwrap_err();
            assert!(error.contains("no decimals"), "{decimal}: {error}");
        }
        let huge = parse_size("123456789012345678901234").unwrap_err();
        assert!(huge.contains("too large"), "{huge}");
    }

    #[test]
    fn vm_sizes_the_vmm_refuses_are_usage_errors() {
        use super::{parse_accel_memory, parse_ram};
        assert_eq!(parse_ram("256M"), Ok(256 << 20));
        for bad in ["0", "17M", "8M", "65G"] {
            assert!(parse_ram(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_accel_memory("1G"), Ok(1 << 30));
        assert!(parse_accel_memory("1000").is_err());
        assert!(parse_accel_memory("65G").is_err());
    }
}
