//! The few values read from OBS's XML answers (upload ids, part lists, error codes): the
//! documents are flat and small, so tags are found by name rather than by an XML parser.

/// The text of the first `<name>…</name>` in `xml`, entities decoded.
pub fn tag(xml: &str, name: &str) -> Option<String> {
    tags(xml, name).into_iter().next()
}

/// The text of every `<name>…</name>` in `xml`, in order, entities decoded.
pub fn tags(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(unescape(&after[..j]));
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_parts_and_errors() {
        let x = r#"<?xml version="1.0"?><ListPartsResult><IsTruncated>false</IsTruncated>
            <Part><PartNumber>1</PartNumber><ETag>&quot;abc&quot;</ETag><Size>5</Size></Part>
            <Part><PartNumber>2</PartNumber><ETag>"def"</ETag><Size>7</Size></Part></ListPartsResult>"#;
        assert_eq!(tags(x, "Part").len(), 2);
        assert_eq!(tags(x, "ETag"), vec!["\"abc\"", "\"def\""]);
        assert_eq!(tag(x, "IsTruncated").as_deref(), Some("false"));
        assert_eq!(
            tag("<Error><Code>NoSuchBucket</Code></Error>", "Code").as_deref(),
            Some("NoSuchBucket")
        );
        assert_eq!(tag("<a>", "a"), None);
    }
}
