//! The SOAP request parser and the XML writer.
//!
//! A request is parsed with roxmltree (already a dependency, for OVF descriptors) into a
//! small owned tree, within bounds checked before anything else reads it: the body size
//! (by the caller), the number of nodes (roxmltree's own limit, checked while it parses)
//! and the element depth (checked here while copying). DTDs are refused, so no entity
//! can expand. What the tree keeps of each element: its local name (namespaces do not
//! matter to vim25's method and field names), `xsi:type` and `type` (a moref's kind), its
//! text, its child elements.

use super::fault::Fault;

/// The largest SOAP request body read; larger ones get a fault before parsing.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// The most XML nodes (elements, attributes, text) one request may hold.
pub const MAX_NODES: u32 = 50_000;
/// The deepest element nesting one request may hold (a deep PropertyFilterSpec of
/// nested TraversalSpecs needs about twenty).
pub const MAX_DEPTH: usize = 64;

const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// One element of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    /// `xsi:type` without its namespace prefix.
    pub xsi_type: Option<String>,
    /// The plain `type` attribute: a ManagedObjectReference's kind.
    pub type_attr: Option<String>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The trimmed text of child `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    /// Child `name` as a boolean (`true`/`1`); absent is `None`.
    pub fn bool_of(&self, name: &str) -> Result<Option<bool>, Fault> {
        match self.text_of(name) {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(Fault::invalid_argument(
                name,
                format!("{name} is {other:?}, not a boolean (true or false)"),
            )),
        }
    }
}

/// A parsed SOAP call: the method (the Body's first element) and its arguments.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub body: Element,
}

/// Parses a SOAP 1.1 envelope within the bounds above.
pub fn parse_call(body: &[u8]) -> Result<Call, Fault> {
    if body.len() > MAX_BODY_BYTES {
        return Err(Fault::invalid_request(format!(
            "the request body holds {} bytes, more than the {MAX_BODY_BYTES} a SOAP call may; send a smaller call",
            body.len()
        )));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| Fault::invalid_request(format!("the request body is not UTF-8 ({e}); send UTF-8 XML")))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| {
        Fault::invalid_request(format!(
            "the request is not a well-formed XML document within {MAX_NODES} nodes and without a DTD: {e}"
        ))
    })?;
    let envelope = doc.root_element();
    if envelope.tag_name().name() != "Envelope" {
        return Err(Fault::invalid_request(format!(
            "the request's root element is <{}>, not a SOAP <Envelope>",
            envelope.tag_name().name()
        )));
    }
    let soap_body = envelope
        .children()
        .find(|n| n.is_element() && n.tag_name().name() == "Body")
        .ok_or_else(|| Fault::invalid_request("the SOAP envelope has no <Body>"))?;
    let method = soap_body
        .children()
        .find(roxmltree::Node::is_element)
        .ok_or_else(|| Fault::invalid_request("the SOAP <Body> names no method"))?;
    let body = copy(method, 2)?;
    Ok(Call {
        method: body.name.clone(),
        body,
    })
}

fn copy(node: roxmltree::Node<'_, '_>, depth: usize) -> Result<Element, Fault> {
    if depth > MAX_DEPTH {
        return Err(Fault::invalid_request(format!(
            "the request nests elements deeper than {MAX_DEPTH} levels; no vim25 call needs that many"
        )));
    }
    let strip = |t: &str| t.rsplit_once(':').map_or(t, |(_, local)| local).to_owned();
    let mut element = Element {
        name: node.tag_name().name().to_owned(),
        xsi_type: node.attribute((XSI, "type")).map(strip),
        type_attr: node.attribute("type").map(str::to_owned),
        ..Element::default()
    };
    for child in node.children() {
        if child.is_element() {
            element.children.push(copy(child, depth + 1)?);
        } else if child.is_text() {
            element.text.push_str(child.text().unwrap_or_default());
        }
    }
    Ok(element)
}

/// Escapes text and attribute values.
pub fn escape(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry are dropped rather than sent broken.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
}

/// The envelope around a response body.
pub const ENVELOPE_START: &str = concat!(
    r#"<?xml version="1.0" encoding="UTF-8"?>"#,
    "\n",
    r#"<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" "#,
    r#"xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" "#,
    r#"xmlns:xsd="http://www.w3.org/2001/XMLSchema" "#,
    r#"xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">"#,
    "\n<soapenv:Body>\n"
);
pub const ENVELOPE_END: &str = "</soapenv:Body>\n</soapenv:Envelope>\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(inner: &str) -> String {
        format!(
            r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{inner}</soapenv:Body></soapenv:Envelope>"#
        )
    }

    #[test]
    fn a_call_is_read_with_types_and_text() {
        let call = parse_call(
            envelope(r#"<RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this><x xsi:type="vim25:TraversalSpec"> a&amp;b </x></RetrieveServiceContent>"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(call.method, "RetrieveServiceContent");
        let this = call.body.child("_this").unwrap();
        assert_eq!(this.type_attr.as_deref(), Some("ServiceInstance"));
        assert_eq!(this.text, "ServiceInstance");
        let x = call.body.child("x").unwrap();
        assert_eq!(x.xsi_type.as_deref(), Some("TraversalSpec"));
        assert_eq!(x.text.trim(), "a&b");
    }

    #[test]
    fn bounds_and_malformed_requests_are_faults() {
        let deep = format!("<M>{}{}</M>", "<a>".repeat(100), "</a>".repeat(100));
        let fault = parse_call(envelope(&deep).as_bytes()).unwrap_err();
        assert!(fault.message.contains("deeper than"), "{}", fault.message);
        let many = format!("<M>{}</M>", "<a/>".repeat(60_000));
        let fault = parse_call(envelope(&many).as_bytes()).unwrap_err();
        assert!(fault.message.contains("nodes"), "{}", fault.message);
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(parse_call(&big).unwrap_err().message.contains("more than"));
        let dtd = r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>"#;
        assert!(parse_call(dtd.as_bytes()).is_err());
        assert!(parse_call(b"<Envelope><Body/></Envelope>")
            .unwrap_err()
            .message
            .contains("names no method"));
        assert!(parse_call(b"<html/>").unwrap_err().message.contains("not a SOAP"));
        assert!(parse_call(b"\xff\xfe").is_err());
    }
}
