//! vim25 values and how they are written. Every element carries its `xsi:type`, and an
//! array that stands alone (a property's `val`) is wrapped in its `ArrayOf...` type,
//! because pyvmomi's deserializer types a value by those attributes wherever the WSDL
//! says `anyType`; inside a data object an array is its field's element repeated.

use super::xml::escape;

/// A managed object reference: `<obj type="VirtualMachine">vm-14</obj>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.to_owned(),
            value: value.to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Long(i64),
    Bool(bool),
    /// `xsd:dateTime`, already formatted.
    Time(String),
    /// An enum value with its enum type (`VirtualMachinePowerState`, `poweredOn`).
    Enum(&'static str, String),
    Ref(MoRef),
    /// A data object: its type and fields in the WSDL's order.
    Data(&'static str, Vec<(&'static str, Value)>),
    /// An array: the item's declared type (`VirtualDevice`, `ManagedObjectReference`,
    /// `string`) and the items.
    Array(&'static str, Vec<Value>),
}

impl Value {
    pub fn str(s: &str) -> Value {
        Value::Str(s.to_owned())
    }

    pub fn refs(items: impl IntoIterator<Item = MoRef>) -> Value {
        Value::Array("ManagedObjectReference", items.into_iter().map(Value::Ref).collect())
    }

    pub fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Value {
        Value::Array("string", items.into_iter().map(Value::str).collect())
    }

    /// Field `name` of a data object.
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Data(_, fields) => fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The morefs in this value (one, or an array of them).
    pub fn morefs(&self) -> Vec<MoRef> {
        match self {
            Value::Ref(r) => vec![r.clone()],
            Value::Array(_, items) => items.iter().flat_map(Value::morefs).collect(),
            _ => Vec::new(),
        }
    }

    /// Writes the value as field `name` of a data object: an array as repeated elements.
    pub fn write_field(&self, out: &mut String, name: &str) {
        match self {
            Value::Array(_, items) => {
                for item in items {
                    item.write(out, name);
                }
            }
            _ => self.write(out, name),
        }
    }

    /// Writes the value as one element `name`: an array in its `ArrayOf...` wrapper.
    pub fn write(&self, out: &mut String, name: &str) {
        let simple = |out: &mut String, xsi: &str, text: &str| {
            out.push_str(&format!("<{name} xsi:type=\"{xsi}\">"));
            escape(out, text);
            out.push_str(&format!("</{name}>"));
        };
        match self {
            Value::Str(s) => simple(out, "xsd:string", s),
            Value::Int(n) => simple(out, "xsd:int", &n.to_string()),
            Value::Long(n) => simple(out, "xsd:long", &n.to_string()),
            Value::Bool(b) => simple(out, "xsd:boolean", if *b { "true" } else { "false" }),
            Value::Time(t) => simple(out, "xsd:dateTime", t),
            Value::Enum(kind, v) => simple(out, kind, v),
            Value::Ref(r) => {
                out.push_str(&format!("<{name} type=\""));
                escape(out, &r.kind);
                out.push_str("\" xsi:type=\"ManagedObjectReference\">");
                escape(out, &r.value);
                out.push_str(&format!("</{name}>"));
            }
            Value::Data(kind, fields) => {
                out.push_str(&format!("<{name} xsi:type=\"{kind}\">"));
                for (field, value) in fields {
                    value.write_field(out, field);
                }
                out.push_str(&format!("</{name}>"));
            }
            Value::Array(item, items) => {
                out.push_str(&format!("<{name} xsi:type=\"{}\">", array_type(item)));
                for value in items {
                    value.write(out, item);
                }
                out.push_str(&format!("</{name}>"));
            }
        }
    }
}

/// `ArrayOfString` for `string`, `ArrayOfVirtualDevice` for `VirtualDevice`.
fn array_type(item: &str) -> String {
    let mut chars = item.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase()).unwrap_or('X');
    format!("ArrayOf{first}{}", chars.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_types() {
        let mut out = String::new();
        Value::refs([MoRef::new("VirtualMachine", "vm-1")]).write(&mut out, "val");
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfManagedObjectReference"><ManagedObjectReference type="VirtualMachine" xsi:type="ManagedObjectReference">vm-1</ManagedObjectReference></val>"#
        );
        let mut out = String::new();
        Value::Data(
            "Description",
            vec![("label", Value::str("a<b")), ("keys", Value::strings(["x", "y"]))],
        )
        .write(&mut out, "deviceInfo");
        assert_eq!(
            out,
            r#"<deviceInfo xsi:type="Description"><label xsi:type="xsd:string">a&lt;b</label><keys xsi:type="xsd:string">x</keys><keys xsi:type="xsd:string">y</keys></deviceInfo>"#
        );
        let mut out = String::new();
        Value::strings(["a"]).write(&mut out, "val");
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfString"><string xsi:type="xsd:string">a</string></val>"#
        );
    }
}
