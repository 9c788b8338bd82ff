//! The grammar of one write to `backups/<target>/request`:
//! `<volume-id> [wait] [incremental] [name=<label>] [device=<path>]`, one line, at most
//! one trailing newline.
//! Pure parsing: it never looks a volume up.

use crate::ids::VolumeId;

pub const MAX_LINE: usize = 4096;
pub const MAX_LABEL: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRequest {
    pub volume_id: VolumeId,
    pub wait: bool,
    pub name: Option<String>,
    /// Copy only what changed since the volume's newest available backup on the target.
    pub incremental: bool,
    /// Back up the block device at this absolute path as the volume (what Cinder attached
    /// to this node), instead of looking the volume up in the backends.
    pub device: Option<String>,
}

pub const USAGE: &str = "\
usage: echo \"<volume-id> [wait] [incremental] [name=<label>] [device=<path>]\" > request
       (a label with spaces in double quotes: name=\"nightly db\")
  wait          the write returns when the backup has ended (fails with its errno)
  incremental   copy only what changed since the volume's newest backup here
  name=<label>  a label kept in the backup's record
  device=<path> back up the block device at <path> (absolute) as the volume
After a write, reading the same open file gives the new backup's id.
";

/// Splits a line into words at spaces; a double-quoted part keeps its spaces
/// (`name="nightly db"`), and inside it `\"` and `\\` stand for `"` and `\`.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' => words.extend(word.take()),
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        None => return Err("a quote is not closed".to_string()),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(escaped @ ('"' | '\\')) => current.push(escaped),
                            _ => return Err("in quotes, \\ escapes only \" and \\".to_string()),
                        },
                        Some(other) => current.push(other),
                    }
                }
            }
            other => word.get_or_insert_with(String::new).push(other),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Parses one request; the error says what is wrong, for the log.
pub fn parse(bytes: &[u8]) -> Result<BackupRequest, String> {
    if bytes.len() > MAX_LINE {
        return Err(format!("request longer than {MAX_LINE} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "request is not UTF-8".to_string())?;
    let line = text
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(text);
    if let Some(c) = line.chars().find(|c| c.is_control()) {
        return Err(if c == '\n' {
            "one request per write: found a second line".to_string()
        } else {
            format!("control character {c:?} in request")
        });
    }
    let words = split_words(line)?;
    let mut words = words.iter().map(String::as_str);
    let volume_id = words.next().ok_or("empty request")?;
    let volume_id = VolumeId::parse(volume_id).map_err(|e| e.to_string())?;
    let mut request = BackupRequest {
        volume_id,
        wait: false,
        name: None,
        incremental: false,
        device: None,
    };
    for word in words {
        if word == "wait" {
            if request.wait {
                return Err("option wait given twice".to_string());
            }
            request.wait = true;
        } else if let Some(label) = word.strip_prefix("name=") {
            if request.name.is_some() {
                return Err("option name given twice".to_string());
            }
            if label.is_empty() || label.len() > MAX_LABEL {
                return Err(format!("name must be 1 to {MAX_LABEL} bytes"));
            }
            request.name = Some(label.to_string());
        } else if let Some(path) = word.strip_prefix("device=") {
            if request.device.is_some() {
                return Err("option device given twice".to_string());
            }
            if !path.starts_with('/') {
                return Err(format!("device={path:?} is not an absolute path"));
            }
            request.device = Some(path.to_string());
        } else if word == "incremental" {
            if request.incremental {
                return Err("option incremental given twice".to_string());
            }
            request.incremental = true;
        } else {
            return Err(format!("unknown option {word:?}"));
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(
            parse(b"vol-1\n").unwrap(),
            BackupRequest {
                volume_id: VolumeId::parse("vol-1").unwrap(),
                wait: false,
                name: None,
                incremental: false,
                device: None,
            }
        );
        let r = parse(b"vol-1 device=/dev/sdb wait").unwrap();
        assert_eq!(r.device.as_deref(), Some("/dev/sdb"));
        let r = parse(b"vol-1 wait name=nightly").unwrap();
        assert!(r.wait);
        assert_eq!(r.name.as_deref(), Some("nightly"));
        assert!(parse(b"vol-1  name=x\r\n").is_ok());
        assert!(parse(b"vol-1 incremental wait\n").unwrap().incremental);
        let r = parse(br#"vol-1 name="nightly db" wait"#).unwrap();
        assert_eq!(r.name.as_deref(), Some("nightly db"));
        assert!(r.wait);
        let r = parse(br#"vol-1 name="say \"hi\" \\o/""#).unwrap();
        assert_eq!(r.name.as_deref(), Some(r#"say "hi" \o/"#));
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in [
            &b""[..],
            b"\n",
            b" \n",
            b"../etc\n",
            b"vol wait wait\n",
            b"vol name=\n",
            b"vol name=a name=b\n",
            b"vol frobnicate\n",
            b"vol\nvol2\n",
            b"vol\tawait\n",
            b"\xff\xfe\n",
            b"vol incremental incremental\n",
            b"v\0l\n",
            b"vol name=\"open\n",
            b"vol name=\"a\\b\"\n",
            b"vol name=\"\"\n",
            b"vol device=\n",
            b"vol device=dev/sdb\n",
            b"vol device=/dev/a device=/dev/b\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&vec![b'a'; MAX_LINE + 1]).is_err());
    }
}
