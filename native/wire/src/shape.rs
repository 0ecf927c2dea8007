//! A statement's shape: its text with each constant replaced by `$n`, in the format of
//! pg_query's normalisation, for a conservative subset of SQL only.
//!
//! Why a subset: the relay answers a statement without asking Python only when the guard's
//! verdict for its shape is known, and the guard's shape verdicts are keyed by pg_query's
//! normalised text. So two texts may share a key here only if PostgreSQL's lexer reads them
//! as the same tokens except for the constants' values. The subset is where this lexer and
//! PostgreSQL's agree byte for byte: no comments, no `$` (parameters, dollar quotes), no
//! backslash, no prefixed strings (E'', B'', X'', U&'', N''), numbers of digits with at most
//! one decimal point and nothing glued to them. Anything else gives `None` (Python decides).
//! Python also checks, once per key, that pg_query normalises the first text to exactly
//! the shape given here before it lets the relay use the key.

/// (normalised text, kinds of the constants: `i` integer, `d` decimal, `s` string), or None.
pub fn shape(text: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(text.len());
    let mut kinds = Vec::new();
    let mut i = 0;
    let n = text.len();
    while i < n {
        let c = text[i];
        match c {
            b'\'' => {
                if i > 0 && glued(text[i - 1]) {
                    return None; // E'..', B'..', X'..', N'..', U&'..'
                }
                let mut j = i + 1;
                loop {
                    if j >= n {
                        return None; // unterminated: PostgreSQL's error, not ours
                    }
                    match text[j] {
                        b'\\' | 0 => return None,
                        b'\'' if j + 1 < n && text[j + 1] == b'\'' => j += 2,
                        b'\'' => break,
                        _ => j += 1,
                    }
                }
                // Adjacent strings separated by a newline are one constant in PostgreSQL.
                if j + 1 < n && (text[j + 1] == b'\'' || is_space(text[j + 1])) {
                    let mut k = j + 1;
                    while k < n && is_space(text[k]) {
                        k += 1;
                    }
                    if k < n && text[k] == b'\'' {
                        return None;
                    }
                }
                kinds.push(b's');
                push_param(&mut out, kinds.len());
                i = j + 1;
            }
            b'"' => {
                let mut j = i + 1;
                loop {
                    if j >= n {
                        return None;
                    }
                    match text[j] {
                        0 => return None,
                        b'"' if j + 1 < n && text[j + 1] == b'"' => j += 2,
                        b'"' => break,
                        _ => j += 1,
                    }
                }
                out.extend_from_slice(&text[i..=j]);
                i = j + 1;
            }
            b'0'..=b'9' => {
                if i > 0 && (text[i - 1] == b'.' || glued(text[i - 1])) {
                    return None;
                }
                let mut j = i;
                while j < n && text[j].is_ascii_digit() {
                    j += 1;
                }
                let mut kind = b'i';
                if j < n && text[j] == b'.' {
                    if j + 1 < n && text[j + 1].is_ascii_digit() {
                        j += 1;
                        while j < n && text[j].is_ascii_digit() {
                            j += 1;
                        }
                        kind = b'd';
                    } else {
                        return None; // "1." or "1..": PostgreSQL's own lexing
                    }
                }
                if j < n && (glued(text[j]) || text[j] == b'.') {
                    return None; // 1e5, 0x1F, 1_000, 1.2.3
                }
                kinds.push(kind);
                push_param(&mut out, kinds.len());
                i = j;
            }
            b'$' | b'\\' | 0 => return None,
            b'-' if i + 1 < n && text[i + 1] == b'-' => return None,
            b'/' if i + 1 < n && text[i + 1] == b'*' => return None,
            _ if starts_word(c) => {
                let mut j = i + 1;
                while j < n && glued(text[j]) {
                    j += 1;
                }
                if j < n && text[j] == b'\'' {
                    return None; // a prefixed string
                }
                out.extend_from_slice(&text[i..j]);
                i = j;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some((out, kinds))
}

fn push_param(out: &mut Vec<u8>, number: usize) {
    out.push(b'$');
    out.extend_from_slice(number.to_string().as_bytes());
}

fn starts_word(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

/// A byte that continues an identifier or keyword (PostgreSQL: letters, digits, `_`, `$`,
/// and every non-ASCII byte), or prefixes a string (`&` of `U&`).
fn glued(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'&' || c >= 0x80
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')
}

#[cfg(test)]
mod tests {
    use super::shape;

    fn norm(text: &str) -> Option<String> {
        shape(text.as_bytes()).map(|(s, _)| String::from_utf8(s).unwrap())
    }

    #[test]
    fn constants_become_parameters_in_order() {
        assert_eq!(
            norm("SELECT abalance FROM pgbench_accounts WHERE aid = 4523;").unwrap(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
        );
        assert_eq!(
            norm("select * from t where a = 'x''y' and b = 1.5 limit 3").unwrap(),
            "select * from t where a = $1 and b = $2 limit $3"
        );
    }

    #[test]
    fn identifiers_keep_their_digits() {
        assert_eq!(norm("SELECT t1.c2 FROM t1").unwrap(), "SELECT t1.c2 FROM t1");
        assert_eq!(norm("SELECT \"a 'b' 1\" FROM t").unwrap(), "SELECT \"a 'b' 1\" FROM t");
    }

    #[test]
    fn kinds_tell_integers_decimals_and_strings_apart() {
        assert_eq!(shape(b"SELECT 1, 2.5, 'x'").unwrap().1, b"ids".to_vec());
    }

    #[test]
    fn anything_outside_the_subset_is_left_to_python() {
        for text in [
            "SELECT 1 -- c",
            "SELECT /* c */ 1",
            "SELECT $1",
            "SELECT $$x$$",
            "SELECT E'x'",
            "SELECT e'\\n'",
            "SELECT B'101'",
            "SELECT X'1F'",
            "SELECT U&'x'",
            "SELECT N'x'",
            "SELECT 'a\\b'",
            "SELECT 1e5",
            "SELECT 0x1F",
            "SELECT 1_000",
            "SELECT 1.",
            "SELECT .5",
            "SELECT 1.2.3",
            "SELECT 'a'\n'b'",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
        ] {
            assert!(norm(text).is_none(), "{text}");
        }
    }
}
