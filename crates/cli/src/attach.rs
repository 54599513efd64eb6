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

/// [`parse_attach`] for a VM of this process (`ferry run`, `ferry restore`): the path is
/// made absolute, as a snapshot records it and a restore run from another folder finds
/// it. (A daemon's VM is given the path as typed: it is a path on that daemon's host.)
pub fn parse_local_attach(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = parse_attach(text)?;
    let path = std::path::absolute(&path)
        .map_err(|e| format!("'{text}': cannot make {} absolute: {e}", path.display()))?;
    Ok((name, path))
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
        // Where this process runs it, made absolute (the folder it runs in).
        let (_, local) = parse_local_attach("model=models/x.gguf").unwrap();
        let here = std::env::current_dir().unwrap();
        assert_eq!(local, here.join("models/x.gguf"));
        assert_eq!(
            parse_attach("model=models/x.gguf").unwrap().1,
            PathBuf::from("models/x.gguf")
        );
    }
}
