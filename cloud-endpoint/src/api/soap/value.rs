//! vim25 values and how they are written. A value that stands alone (a property's `val`,
//! a method's `returnval`) carries its `xsi:type`, an array wrapped in its `ArrayOf...`
//! type, because pyvmomi's deserializer types a value by those attributes wherever the
//! WSDL says `anyType`. Inside a data object an array is its field's element repeated,
//! and a string, number, boolean, time or enum field goes without `xsi:type`, as vCenter
//! writes it: its type is the field's, which the client knows from the WSDL, and looking
//! up a type name for each of the tens of thousands of such fields in a large retrieval
//! was a good part of pyvmomi's time. Data objects and references keep theirs (a field's
//! value may be a subtype: a `VirtualDisk` in a `VirtualDevice` list), and a field
//! declared `anyType` is a [`Value::Any`], written with its type.

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
    /// The value of a field declared `anyType` (`PropertyChange.val`, `TaskInfo.result`):
    /// written with its `xsi:type` inside a data object too.
    Any(Box<Value>),
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
            Value::Any(v) => v.morefs(),
            _ => Vec::new(),
        }
    }

    /// Writes the value as field `name` of a data object: an array as repeated elements,
    /// a simple value without `xsi:type` (see the module's comment).
    pub fn write_field(&self, out: &mut String, name: &str) {
        let plain = |out: &mut String, text: &str| {
            out.push('<');
            out.push_str(name);
            out.push('>');
            escape(out, text);
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        };
        match self {
            Value::Array(_, items) => {
                for item in items {
                    item.write_field(out, name);
                }
            }
            Value::Str(s) | Value::Time(s) | Value::Enum(_, s) => plain(out, s),
            Value::Int(n) | Value::Long(n) => plain(out, &n.to_string()),
            Value::Bool(b) => plain(out, if *b { "true" } else { "false" }),
            Value::Any(v) => v.write(out, name),
            Value::Ref(_) | Value::Data(..) => self.write(out, name),
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
            Value::Any(v) => v.write(out, name),
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
            r#"<deviceInfo xsi:type="Description"><label>a&lt;b</label><keys>x</keys><keys>y</keys></deviceInfo>"#
        );
        // A field declared anyType keeps its type; a reference or data object always does.
        let mut out = String::new();
        Value::Data(
            "PropertyChange",
            vec![
                ("name", Value::str("info.state")),
                (
                    "val",
                    Value::Any(Box::new(Value::Enum("TaskInfoState", "success".into()))),
                ),
                ("obj", Value::Ref(MoRef::new("Task", "task-1"))),
            ],
        )
        .write(&mut out, "change");
        assert_eq!(
            out,
            r#"<change xsi:type="PropertyChange"><name>info.state</name><val xsi:type="TaskInfoState">success</val><obj type="Task" xsi:type="ManagedObjectReference">task-1</obj></change>"#
        );
        let mut out = String::new();
        Value::strings(["a"]).write(&mut out, "val");
        assert_eq!(
            out,
            r#"<val xsi:type="ArrayOfString"><string xsi:type="xsd:string">a</string></val>"#
        );
    }
}
