//! Relative paths from the wire, checked before any syscall sees them, and exclude patterns.
//!
//! A path names an entry below the target root as `/`-separated components. It is refused when
//! absolute, when a component is empty, `.` or `..`, longer than `NAME_MAX`, or holds a NUL, and
//! when the whole is longer than `PATH_MAX`: such a path could leave the root or confuse a later
//! pass. The empty path is the root itself.

use super::proto::{MAX_NAME, MAX_PATH};

/// Why a path from the peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Starts with `/`.
    #[error("absolute path refused")]
    Absolute,
    /// Has an empty component (`a//b`, trailing `/`).
    #[error("empty path component refused")]
    Empty,
    /// Has a `.` or `..` component.
    #[error("`.` or `..` path component refused")]
    Dots,
    /// Holds a NUL byte.
    #[error("NUL byte in path refused")]
    Nul,
    /// A component over `NAME_MAX` or a path over `PATH_MAX`.
    #[error("path or name too long")]
    TooLong,
    /// The root was named where an entry below it is needed.
    #[error("the root itself cannot be used here")]
    Root,
}

/// The components of `path`, checked; the empty path has none (the root).
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if path[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if path.contains(&0) {
        return Err(PathError::Nul);
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        if c.is_empty() {
            return Err(PathError::Empty);
        }
        if c == b"." || c == b".." {
            return Err(PathError::Dots);
        }
        if c.len() > MAX_NAME {
            return Err(PathError::TooLong);
        }
        out.push(c);
    }
    Ok(out)
}

/// (parent components, final name) of a path below the root.
pub fn split(path: &[u8]) -> Result<(Vec<&[u8]>, &[u8]), PathError> {
    let mut c = components(path)?;
    let name = c.pop().ok_or(PathError::Root)?;
    Ok((c, name))
}

/// Joins a relative directory path and a name.
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    if !dir.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// The parent part of a relative path (empty for a name directly below the root).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => &[],
    }
}

/// Paths excluded from a pass, relative to the target root: a pattern matches an entry and
/// everything below it; `*` in a pattern component matches any run of bytes in a name
/// (`tmp/_MEI*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excludes {
    patterns: Vec<Vec<u8>>,
}

/// Excluded by default on every source (issue 5 §1), as paths of the system being migrated.
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp/_MEI*",
    "/var/lib/ntp/proc",
];

fn glob(pat: &[u8], name: &[u8]) -> bool {
    match pat.iter().position(|&b| b == b'*') {
        None => pat == name,
        Some(i) => {
            let (head, tail) = (&pat[..i], &pat[i + 1..]);
            if !name.starts_with(head) {
                return false;
            }
            let rest = &name[head.len()..];
            (0..=rest.len()).any(|k| glob(tail, &rest[k..]))
        }
    }
}

impl Excludes {
    /// From patterns; leading and trailing `/` are ignored, empty patterns dropped.
    pub fn new<I, P>(patterns: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let mut v: Vec<Vec<u8>> = Vec::new();
        for p in patterns {
            let mut p = p.as_ref();
            while let [b'/', rest @ ..] = p {
                p = rest;
            }
            while let [rest @ .., b'/'] = p {
                p = rest;
            }
            if !p.is_empty() && !v.iter().any(|q| q == p) {
                v.push(p.to_vec());
            }
        }
        Self { patterns: v }
    }

    /// The patterns (relative).
    pub fn patterns(&self) -> &[Vec<u8>] {
        &self.patterns
    }

    /// Whether `rel` (a relative path) is excluded.
    pub fn matches(&self, rel: &[u8]) -> bool {
        if rel.is_empty() {
            return false;
        }
        self.patterns.iter().any(|p| {
            let mut pc = p.split(|&b| b == b'/');
            let mut rc = rel.split(|&b| b == b'/');
            loop {
                match (pc.next(), rc.next()) {
                    (None, _) => return true,
                    (Some(_), None) => return false,
                    (Some(a), Some(b)) => {
                        if !glob(a, b) {
                            return false;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        assert_eq!(components(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(components(b"../../etc/passwd"), Err(PathError::Dots));
        assert_eq!(components(b"a/../../b"), Err(PathError::Dots));
        assert_eq!(components(b"a/./b"), Err(PathError::Dots));
        assert_eq!(components(b"a//b"), Err(PathError::Empty));
        assert_eq!(components(b"a/"), Err(PathError::Empty));
        assert_eq!(components(b"a\0b"), Err(PathError::Nul));
        assert_eq!(components(&[b'a'; 256]), Err(PathError::TooLong));
        let long: Vec<u8> = std::iter::repeat_n(b"abc/".as_slice(), 1025)
            .flatten()
            .copied()
            .collect();
        assert_eq!(components(&long), Err(PathError::TooLong));
        assert_eq!(split(b""), Err(PathError::Root));
    }

    #[test]
    fn good_paths_split() {
        assert!(components(b"").unwrap().is_empty());
        assert_eq!(
            components(b"usr/\xff\xfe/..x").unwrap(),
            vec![&b"usr"[..], b"\xff\xfe", b"..x"]
        );
        let (p, n) = split(b"a/b/c").unwrap();
        assert_eq!((p, n), (vec![&b"a"[..], b"b"], &b"c"[..]));
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a/b", b"x"), b"a/b/x");
        assert_eq!(parent(b"a/b/x"), b"a/b");
        assert_eq!(parent(b"x"), b"");
    }

    #[test]
    fn excludes_match_entries_and_below() {
        let e = Excludes::new(
            DEFAULT_EXCLUDES
                .iter()
                .chain(&["/data/cache/", "lost+found"]),
        );
        assert!(e.matches(b"proc"));
        assert!(e.matches(b"proc/1/status"));
        assert!(!e.matches(b"procfs"));
        assert!(!e.matches(b"usr/proc"));
        assert!(e.matches(b"tmp/_MEI12345"));
        assert!(e.matches(b"tmp/_MEI12345/lib.so"));
        assert!(!e.matches(b"tmp/x_MEI"));
        assert!(!e.matches(b"tmp"));
        assert!(e.matches(b"var/lib/ntp/proc"));
        assert!(!e.matches(b"var/lib/ntp"));
        assert!(e.matches(b"data/cache"));
        assert!(e.matches(b"lost+found"));
        assert!(!e.matches(b""));
        assert!(glob(b"a*b*c", b"aXXbYYc"));
        assert!(!glob(b"a*b*c", b"aXXbYY"));
        assert!(glob(b"*", b""));
    }
}
