//! nginx's upstream timeouts, read from its configuration (`nginx -T` output, or a conf
//! file and what it includes), so that a timed-out upstream connection can be compared with
//! the timer that ended it: nginx invents the "110: Connection timed out" it logs, and no
//! syscall says which of its timers fired.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

/// nginx's default for each proxy timeout.
const DEFAULT: Duration = Duration::from_mins(1);
/// Includes followed at most, against include loops.
const FILES_MAX: usize = 256;

/// The values each timeout directive takes anywhere in the configuration (a location may set
/// its own), in the order found; the default when a directive is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Vec<Duration>,
    pub read: Vec<Duration>,
}

impl Timeouts {
    /// Reads `path`: `nginx -T` output (every file inline) or a conf file, whose `include`s
    /// are followed (relative to its directory, as nginx resolves them from its prefix).
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let mut text = String::new();
        let mut files = vec![path.to_path_buf()];
        let mut seen = 0;
        while let Some(file) = files.pop() {
            seen += 1;
            if seen > FILES_MAX {
                break;
            }
            let body = fs::read_to_string(&file);
            // The file named on the command line must be there; an include may be stale.
            let body = if seen == 1 {
                body?
            } else {
                body.unwrap_or_default()
            };
            let base = file.parent().unwrap_or(Path::new("/")).to_path_buf();
            // `nginx -T` output already holds every included file.
            if !body.contains("# configuration file ") {
                files.extend(includes(&body, &base));
            }
            text.push_str(&body);
            text.push('\n');
        }
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut t = Self::default();
        for (name, value) in directives(text) {
            let Some(d) = parse_time(value) else {
                continue;
            };
            let list = match name {
                "proxy_connect_timeout" | "uwsgi_connect_timeout" | "fastcgi_connect_timeout" => {
                    &mut t.connect
                }
                "proxy_read_timeout" | "uwsgi_read_timeout" | "fastcgi_read_timeout" => &mut t.read,
                _ => continue,
            };
            if !list.contains(&d) {
                list.push(d);
            }
        }
        t
    }

    /// The directive behind a timeout in `phase` ("connect" or "response"), with its values
    /// ("proxy_read_timeout 1s"), and whether the connections' durations (`min`..`max`) end at
    /// one of them: within a tenth, or 50 ms for short ones (nginx's timers fire late by a
    /// loop turn, never early).
    pub fn explain(&self, phase: &str, min: Duration, max: Duration) -> (String, bool) {
        let (name, values) = if phase == "connect" {
            ("proxy_connect_timeout", &self.connect)
        } else {
            ("proxy_read_timeout", &self.read)
        };
        let defaulted = [DEFAULT];
        let values: &[Duration] = if values.is_empty() {
            &defaulted
        } else {
            values
        };
        let shown: Vec<String> = values.iter().map(|d| format_time(*d)).collect();
        let matches = values.iter().any(|v| {
            let slack = (*v / 10).max(Duration::from_millis(50));
            min + slack >= *v && max <= *v + slack
        });
        (format!("{name} {}", shown.join("/")), matches)
    }
}

/// `name value;` pairs of simple directives, comments dropped.
fn directives(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .flat_map(|line| line.split([';', '{', '}']))
        .filter_map(|stmt| {
            let mut words = stmt.split_whitespace();
            Some((words.next()?, words.next()?))
        })
}

/// The files an `include` names, globs expanded (nginx's `include conf.d/*.conf`).
fn includes(text: &str, base: &Path) -> Vec<PathBuf> {
    directives(text)
        .filter(|(name, _)| *name == "include")
        .flat_map(|(_, pattern)| {
            let pattern = base.join(pattern.trim_matches(['"', '\'']));
            expand(&pattern)
        })
        .collect()
}

/// A path whose last component may hold one `*`.
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![pattern.to_path_buf()];
    };
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// nginx's time syntax: `500ms`, `2s`, `1m`, `1h`, a bare number of seconds, or several
/// summed (`1m30s`).
pub fn parse_time(value: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms = match &rest[..unit] {
            "ms" => 1,
            "" | "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total += Duration::from_millis(n.checked_mul(ms)?);
        rest = &rest[unit..];
    }
    Some(total)
}

/// As nginx would write it: `500ms`, `1s`, `90s`.
fn format_time(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_nginx_reads_them() {
        assert_eq!(parse_time("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_time("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_time("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_time("soon"), None);
        assert_eq!(parse_time(""), None);
    }

    #[test]
    fn directives_anywhere_and_defaults() {
        let t = Timeouts::parse(
            "# configuration file /etc/nginx/nginx.conf:\n\
             http { proxy_connect_timeout 500ms; # proxy_read_timeout 9s;\n\
             server { location / { proxy_read_timeout 1s; proxy_pass http://app; } \
             location /slow { proxy_read_timeout 30s; } } }",
        );
        assert_eq!(t.connect, vec![Duration::from_millis(500)]);
        assert_eq!(
            t.read,
            vec![Duration::from_secs(1), Duration::from_secs(30)]
        );
        let s = Duration::from_millis;
        assert_eq!(
            t.explain("response", s(1001), s(1012)),
            ("proxy_read_timeout 1s/30s".to_string(), true)
        );
        assert_eq!(
            t.explain("connect", s(120), s(130)),
            ("proxy_connect_timeout 500ms".to_string(), false)
        );
        let none = Timeouts::parse("events {}");
        assert_eq!(
            none.explain("response", s(60_004), s(60_010)),
            ("proxy_read_timeout 60s".to_string(), true)
        );
    }

    #[test]
    fn includes_are_followed() {
        let dir = std::env::temp_dir().join(format!("fdtrace-nginx-{}", std::process::id()));
        fs::create_dir_all(dir.join("conf.d")).unwrap();
        fs::write(
            dir.join("nginx.conf"),
            "http { include conf.d/*.conf; proxy_connect_timeout 2s; }",
        )
        .unwrap();
        fs::write(dir.join("conf.d/app.conf"), "proxy_read_timeout 5s;").unwrap();
        let t = Timeouts::read(&dir.join("nginx.conf")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.connect, vec![Duration::from_secs(2)]);
        assert_eq!(t.read, vec![Duration::from_secs(5)]);
        assert!(Timeouts::read(&dir.join("absent.conf")).is_err());
    }
}
