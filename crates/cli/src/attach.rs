//! `--attach NAME=PATH`: a read-only file given to a VM.

use std::path::PathBuf;

/// Parses `NAME=PATH` (the name as the guest finds the file, the path on this host).
pub fn parse_attach(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not NAME=PATH (e.g. model=./SmolLM2.gguf)"))?;
    if !ferry_abi::file::valid_name(name) {
        return Err(format!(
            "'{name}' is not a valid file name: use 1 to {} ASCII letters, digits, '.', '_' or '-'",
            ferry_abi::file::NAME_BYTES - 1
        ));
    }
    if path.is_empty() {
        return Err(format!("'{text}': the path is empty"));
    }
    Ok((name.to_string(), PathBuf::from(path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_split_and_checked() {
        assert_eq!(
            parse_attach("model=/a/b=c.gguf").unwrap(),
            ("model".into(), PathBuf::from("/a/b=c.gguf"))
        );
        assert!(parse_attach("model").is_err());
        assert!(parse_attach("bad name=x").is_err());
        assert!(parse_attach("model=").is_err());
        assert!(parse_attach("=x").is_err());
    }
}
