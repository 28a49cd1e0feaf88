//! Config values written back as TOML literals, for error messages and `--print-config`.

use figment::value::{Num, Value};

/// How a value that is not set (an empty `Option`) is shown.
pub(crate) const UNSET: &str = "(unset)";

/// How a value that is set but secret is shown.
pub(crate) const REDACTED: &str = "(redacted)";

/// `value` as it would be written in a TOML file.
pub(crate) fn literal(value: &Value) -> String {
    match value {
        Value::String(_, text) => quoted(text),
        Value::Char(_, c) => quoted(&c.to_string()),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, num) => number(*num),
        Value::Empty(..) => UNSET.to_owned(),
        Value::Array(_, items) => {
            let items: Vec<String> = items.iter().map(literal).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Dict(_, dict) => {
            let entries: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{} = {}", quoted(k), literal(v)))
                .collect();
            format!("{{ {} }}", entries.join(", "))
        }
    }
}

fn number(num: Num) -> String {
    if let Some(n) = num.to_u128() {
        n.to_string()
    } else if let Some(n) = num.to_i128() {
        n.to_string()
    } else if let Some(n) = num.to_f64() {
        format!("{n:?}")
    } else {
        format!("{num:?}")
    }
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_toml_literals() {
        assert_eq!(literal(&Value::from("4GiB")), "\"4GiB\"");
        assert_eq!(literal(&Value::from("a\"b\\c\n")), r#""a\"b\\c\n""#);
        assert_eq!(literal(&Value::from(500u64)), "500");
        assert_eq!(literal(&Value::from(-3i64)), "-3");
        assert_eq!(literal(&Value::from(true)), "true");
        assert_eq!(
            literal(&Value::from(vec!["a:1".to_owned(), "b:2".to_owned()])),
            r#"["a:1", "b:2"]"#
        );
        assert_eq!(
            literal(&Value::serialize(Option::<String>::None).unwrap()),
            UNSET
        );
    }
}
