//! Guest arguments and a tiny flag parser: `--key value`, `--key=value`, bare switches.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

/// The guest's arguments, as passed by the host (no program name).
#[derive(Clone, Debug)]
pub struct Args {
    items: Vec<&'static str>,
}

/// A bad command line; its message names the flag and says what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgError(String);

impl ArgError {
    /// An error with this message, for a workload's own checks.
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Args {
    /// Wraps already-validated argument strings.
    pub fn new(items: Vec<&'static str>) -> Self {
        Self { items }
    }

    /// Number of arguments.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if there are no arguments.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The argument at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&'static str> {
        self.items.get(index).copied()
    }

    /// The arguments in order.
    pub fn iter(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.items.iter().copied()
    }

    /// True if `--help` or `-h` was given.
    pub fn wants_help(&self) -> bool {
        self.iter().any(|a| a == "--help" || a == "-h")
    }

    /// True if the bare switch `--key` was given.
    pub fn switch(&self, key: &str) -> bool {
        self.iter().any(|a| a.strip_prefix("--") == Some(key))
    }

    /// The text of `--key value` or `--key=value` (the last one wins), `None` if absent.
    pub fn value(&self, key: &str) -> Result<Option<&'static str>, ArgError> {
        let mut found = None;
        let mut i = 0;
        while i < self.items.len() {
            let Some(flag) = self.items[i].strip_prefix("--") else {
                i += 1;
                continue;
            };
            if flag == key {
                // A following flag is not a value: `--seed --mib 4` means --seed is empty.
                match self.get(i + 1).filter(|v| !v.starts_with("--")) {
                    Some(v) => found = Some(v),
                    None => return Err(ArgError(format!("--{key}: missing value"))),
                }
                i += 1;
            } else if let Some(v) = flag.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
                found = Some(v);
            }
            i += 1;
        }
        Ok(found)
    }

    /// `--key` parsed as a `T`, `None` if absent.
    pub fn parse<T>(&self, key: &str) -> Result<Option<T>, ArgError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let Some(text) = self.value(key)? else {
            return Ok(None);
        };
        text.parse()
            .map(Some)
            .map_err(|e| ArgError(format!("--{key}: invalid value {text:?}: {e}")))
    }

    /// `--key` parsed as a `T`, or `default` if absent.
    pub fn parse_or<T>(&self, key: &str, default: T) -> Result<T, ArgError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        Ok(self.parse(key)?.unwrap_or(default))
    }

    /// Fails on a positional argument or a flag that is not in `valued` (flags that
    /// take a value) or `switches` (flags that do not); `--help`/`-h` are always allowed.
    pub fn check(&self, valued: &[&str], switches: &[&str]) -> Result<(), ArgError> {
        let mut rest = self.iter().peekable();
        while let Some(arg) = rest.next() {
            if arg == "--help" || arg == "-h" {
                continue;
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(ArgError(format!("unexpected argument {arg:?}")));
            };
            let (key, inline_value) = match flag.split_once('=') {
                Some((k, _)) => (k, true),
                None => (flag, false),
            };
            if valued.contains(&key) {
                if !inline_value && rest.next_if(|v| !v.starts_with("--")).is_none() {
                    return Err(ArgError(format!("--{key}: missing value")));
                }
            } else if switches.contains(&key) {
                if inline_value {
                    return Err(ArgError(format!("--{key} takes no value")));
                }
            } else {
                return Err(ArgError(format!("unknown flag --{key}")));
            }
        }
        Ok(())
    }
}
