//! vAPI's JSON value encoding: a structure is `{"STRUCTURE":{"<canonical name>":{..}}}`,
//! an optional `{"OPTIONAL":v|null}`, a secret `{"SECRET":s}`, an error
//! `{"ERROR":{"<name>":{..}}}`, a map a list of `map-entry` structures; lists, strings,
//! enums, ids, numbers and booleans are plain JSON, void is null.
//!
//! Results are encoded from the same serde values REST answers with, guided by a
//! [`Shape`] that says what the SDK's bindings expect: the canonical name of each
//! structure and which of its fields are optional. The SDK refuses a required field that
//! is missing and an optional one that is not wrapped, so the encoder refuses them too
//! (as a bug of the endpoint) rather than send something the client cannot read.

use serde_json::{json, Map, Value};

use crate::api::error::ApiError;

/// What the SDK expects at one place of a value.
#[derive(Debug)]
pub enum Shape {
    /// A string, enum, id, number, boolean or date-time: as it is.
    Plain,
    /// May be absent (or null); wrapped in OPTIONAL either way.
    Opt(&'static Shape),
    /// A JSON array, each element of the shape.
    List(&'static Shape),
    /// A JSON object keyed by strings (device ids), each value of the shape.
    Map(&'static Shape),
    /// A structure with its canonical name and its fields.
    Struct(&'static str, &'static [(&'static str, Shape)]),
    /// vAPI's AnyError: a REST error body (`{"error_type","messages"}`) becomes the
    /// standard error it names.
    Error,
    /// Never holds an element here (device kinds the cloud domain has none of); an
    /// element is refused instead of being sent in a shape the SDK would reject.
    Never,
}

/// `{"STRUCTURE":{name:{fields}}}`.
pub fn structure(name: &str, fields: Map<String, Value>) -> Value {
    json!({ "STRUCTURE": { name: fields } })
}

pub fn optional(value: Option<Value>) -> Value {
    json!({ "OPTIONAL": value.unwrap_or(Value::Null) })
}

pub fn secret(value: &str) -> Value {
    json!({ "SECRET": value })
}

/// Encodes `value` (what REST would answer) as `shape` says. `at` names the place for
/// the error message.
pub fn encode(value: &Value, shape: &Shape, at: &str) -> Result<Value, ApiError> {
    let bad = |what: &str| {
        ApiError::internal(
            "a result could not be encoded for the vAPI protocol",
            &format!("{at}: {what}: {value}"),
        )
    };
    match shape {
        Shape::Plain => match value {
            Value::Object(_) | Value::Array(_) | Value::Null => Err(bad("not a plain value")),
            v => Ok(v.clone()),
        },
        Shape::Opt(inner) => match value {
            Value::Null => Ok(optional(None)),
            v => Ok(optional(Some(encode(v, inner, at)?))),
        },
        Shape::List(inner) => {
            let items = value.as_array().ok_or_else(|| bad("not a list"))?;
            let items = items
                .iter()
                .enumerate()
                .map(|(i, v)| encode(v, inner, &format!("{at}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Value::Array(items))
        }
        Shape::Map(inner) => {
            let entries = value.as_object().ok_or_else(|| bad("not a map"))?;
            let entries = entries
                .iter()
                .map(|(k, v)| {
                    let mut entry = Map::new();
                    entry.insert("key".into(), Value::String(k.clone()));
                    entry.insert("value".into(), encode(v, inner, &format!("{at}[{k}]"))?);
                    Ok(structure("map-entry", entry))
                })
                .collect::<Result<Vec<_>, ApiError>>()?;
            Ok(Value::Array(entries))
        }
        Shape::Struct(name, fields) => {
            let object = value.as_object().ok_or_else(|| bad("not a structure"))?;
            if let Some(extra) = object.keys().find(|k| !fields.iter().any(|(f, _)| f == k)) {
                return Err(bad(&format!("field {extra:?} is not in {name}")));
            }
            let mut out = Map::new();
            for (field, shape) in fields.iter() {
                let place = format!("{at}.{field}");
                match (object.get(*field), shape) {
                    (Some(v), shape) => {
                        out.insert((*field).into(), encode(v, shape, &place)?);
                    }
                    (None, Shape::Opt(_)) => {
                        out.insert((*field).into(), optional(None));
                    }
                    (None, _) => return Err(bad(&format!("required field {field:?} of {name} is missing"))),
                }
            }
            Ok(structure(name, out))
        }
        Shape::Error => {
            let kind = value["error_type"].as_str().ok_or_else(|| bad("not an error body"))?;
            let messages = value["messages"]
                .as_array()
                .ok_or_else(|| bad("an error without messages"))?;
            let messages = messages
                .iter()
                .map(|m| {
                    message(
                        m["id"].as_str().unwrap_or_default(),
                        m["default_message"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            Ok(error_value(
                &format!("com.vmware.vapi.std.errors.{}", kind.to_ascii_lowercase()),
                kind,
                messages,
            ))
        }
        Shape::Never => Err(bad("the cloud domain has no such device")),
    }
}

/// A `com.vmware.vapi.std.localizable_message` without parameters.
pub fn message(id: &str, default_message: &str) -> Value {
    let mut fields = Map::new();
    fields.insert("id".into(), json!(id));
    fields.insert("default_message".into(), json!(default_message));
    fields.insert("args".into(), json!([]));
    fields.insert("params".into(), optional(None));
    fields.insert("localized".into(), optional(None));
    structure("com.vmware.vapi.std.localizable_message", fields)
}

/// A standard error value: `{"ERROR":{"com.vmware.vapi.std.errors.not_found":{..}}}`.
pub fn error_value(name: &str, error_type: &str, messages: Vec<Value>) -> Value {
    json!({ "ERROR": { name: {
        "messages": messages,
        "data": { "OPTIONAL": null },
        "error_type": { "OPTIONAL": error_type },
    } } })
}

impl ApiError {
    /// This error as vAPI's standard error of the same kind.
    pub fn vapi_value(&self) -> Value {
        error_value(
            self.kind.message_id(),
            self.kind.error_type(),
            vec![message(self.kind.message_id(), &self.message)],
        )
    }
}

// --- input ---------------------------------------------------------------------------

/// The fields of a structure value `{"STRUCTURE":{name:{fields}}}`, and its name.
pub fn struct_fields(value: &Value) -> Option<(&str, &Map<String, Value>)> {
    let (name, fields) = value.get("STRUCTURE")?.as_object()?.iter().next()?;
    Some((name, fields.as_object()?))
}

/// The value inside `{"OPTIONAL":v}`: `None` for null. A value not wrapped is taken as
/// it is: the SDK always wraps, other clients may not, and the meaning is plain.
pub fn unwrap_optional(value: &Value) -> Option<&Value> {
    let inner = match value.as_object() {
        Some(o) if o.len() == 1 && o.contains_key("OPTIONAL") => &o["OPTIONAL"],
        _ => value,
    };
    (!inner.is_null()).then_some(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: Shape = Shape::Struct("x.address", &[("bus", Shape::Plain), ("unit", Shape::Plain)]);
    const DEVICE: Shape = Shape::Struct(
        "x.device",
        &[
            ("label", Shape::Plain),
            ("scsi", Shape::Opt(&ADDRESS)),
            ("tags", Shape::List(&Shape::Plain)),
        ],
    );
    const DEVICES: Shape = Shape::Map(&DEVICE);

    #[test]
    fn structures_optionals_lists_and_maps() {
        let value = json!({"2000": {"label": "Hard disk 1", "tags": ["a"]}});
        let encoded = encode(&value, &DEVICES, "disks").unwrap();
        assert_eq!(
            encoded,
            json!([{"STRUCTURE": {"map-entry": {
                "key": "2000",
                "value": {"STRUCTURE": {"x.device": {
                    "label": "Hard disk 1",
                    "scsi": {"OPTIONAL": null},
                    "tags": ["a"],
                }}}
            }}}])
        );
        let value = json!({"label": "d", "scsi": {"bus": 0, "unit": 1}, "tags": []});
        assert_eq!(
            encode(&value, &DEVICE, "disk").unwrap()["STRUCTURE"]["x.device"]["scsi"],
            json!({"OPTIONAL": {"STRUCTURE": {"x.address": {"bus": 0, "unit": 1}}}})
        );
    }

    #[test]
    fn missing_required_and_unknown_fields_are_refused() {
        let e = encode(&json!({"label": "d"}), &DEVICE, "disk").unwrap_err();
        assert_eq!(e.kind, crate::api::error::ErrorKind::Error);
        assert!(encode(&json!({"label": "d", "tags": [], "color": "red"}), &DEVICE, "disk").is_err());
        assert!(encode(&json!({"1": {}}), &Shape::Map(&Shape::Never), "cdroms").is_err());
        assert_eq!(
            encode(&json!({}), &Shape::Map(&Shape::Never), "cdroms").unwrap(),
            json!([])
        );
    }

    #[test]
    fn errors_take_the_standard_shape() {
        let e = ApiError::not_found("VM vm-99 is not in the inventory").vapi_value();
        assert_eq!(
            e,
            json!({"ERROR": {"com.vmware.vapi.std.errors.not_found": {
                "messages": [{"STRUCTURE": {"com.vmware.vapi.std.localizable_message": {
                    "id": "com.vmware.vapi.std.errors.not_found",
                    "default_message": "VM vm-99 is not in the inventory",
                    "args": [],
                    "params": {"OPTIONAL": null},
                    "localized": {"OPTIONAL": null},
                }}}],
                "data": {"OPTIONAL": null},
                "error_type": {"OPTIONAL": "NOT_FOUND"},
            }}})
        );
        let body = json!({"error_type": "ERROR", "messages": [{"id": "i", "default_message": "m", "args": []}]});
        assert_eq!(
            encode(&body, &Shape::Error, "error").unwrap()["ERROR"]["com.vmware.vapi.std.errors.error"]["error_type"],
            json!({"OPTIONAL": "ERROR"})
        );
    }

    #[test]
    fn optionals_unwrap() {
        assert_eq!(unwrap_optional(&json!({"OPTIONAL": null})), None);
        assert_eq!(unwrap_optional(&json!({"OPTIONAL": ["a"]})), Some(&json!(["a"])));
        assert_eq!(unwrap_optional(&json!("x")), Some(&json!("x")));
        let s = json!({"STRUCTURE": {"operation-input": {"vm": "vm-1"}}});
        let (name, fields) = struct_fields(&s).unwrap();
        assert_eq!((name, &fields["vm"]), ("operation-input", &json!("vm-1")));
    }
}
