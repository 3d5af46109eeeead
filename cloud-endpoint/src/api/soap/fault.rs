//! vim25 faults: what a client's SOAP library turns into a typed exception
//! (`vim.fault.InvalidLogin`, `vmodl.fault.ManagedObjectNotFound`, ...). Each is a
//! `soapenv:Fault` with a `faultstring` (the message a user reads) and a `detail` holding
//! `<{Type}Fault xsi:type="{Type}">` with the type's fields, sent with HTTP 500 as vCenter
//! does.

use super::value::{MoRef, Value};
use super::xml::{escape, ENVELOPE_END, ENVELOPE_START};
use crate::api::error::{ApiError, ErrorKind};

/// One fault: its vim25 type, the message and the type's fields.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: &'static str,
    pub message: String,
    pub fields: Vec<(&'static str, Value)>,
}

impl Fault {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Fault {
        Fault {
            kind,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    /// The fault with one more of its type's fields.
    pub fn with(mut self, name: &'static str, value: Value) -> Fault {
        self.fields.push((name, value));
        self
    }

    /// A request that is not a vim25 call at all (not XML, too large, too deep): vCenter
    /// answers such a body with InvalidRequest.
    pub fn invalid_request(message: impl Into<String>) -> Fault {
        Fault::new("InvalidRequest", message)
    }

    pub fn invalid_login(message: impl Into<String>) -> Fault {
        Fault::new("InvalidLogin", message)
    }

    /// No session: NotAuthenticated, a NoPermission on the object called.
    pub fn not_authenticated(this: &MoRef) -> Fault {
        Fault::new(
            "NotAuthenticated",
            "The session is not authenticated: log in with SessionManager.Login and send its vmware_soap_session cookie",
        )
        .with("object", Value::Ref(this.clone()))
        .with("privilegeId", Value::str("System.View"))
    }

    pub fn no_permission(object: &MoRef, privilege: &str, message: impl Into<String>) -> Fault {
        Fault::new("NoPermission", message)
            .with("object", Value::Ref(object.clone()))
            .with("privilegeId", Value::str(privilege))
    }

    pub fn not_found(obj: &MoRef) -> Fault {
        Fault::new(
            "ManagedObjectNotFound",
            format!(
                "The object '{}:{}' has already been deleted or has not been completely created",
                obj.kind, obj.value
            ),
        )
        .with("obj", Value::Ref(obj.clone()))
    }

    pub fn invalid_argument(property: &str, message: impl Into<String>) -> Fault {
        Fault::new("InvalidArgument", message).with("invalidProperty", Value::str(property))
    }

    /// A property path (`name`) vim25 does not have, or this endpoint does not answer;
    /// `why` names the step that is not there.
    pub fn invalid_property(name: &str, why: impl std::fmt::Display) -> Fault {
        Fault::new(
            "InvalidProperty",
            format!("the property path {name:?} is not valid: {why}; see docs/soap.md for the properties answered"),
        )
        .with("name", Value::str(name))
    }

    pub fn not_supported(method: &str) -> Fault {
        Fault::new(
            "NotSupported",
            format!("{method} is not supported by this endpoint's vim25 API; docs/soap.md lists the calls it answers"),
        )
    }

    /// A fault for an error of the services shared with REST.
    pub fn from_api(e: &ApiError) -> Fault {
        match e.kind {
            ErrorKind::Unauthenticated => Fault::invalid_login(e.message.clone()),
            ErrorKind::InvalidArgument => Fault::invalid_argument("", e.message.clone()),
            ErrorKind::AlreadyInDesiredState | ErrorKind::NotAllowedInCurrentState => {
                Fault::new("InvalidPowerState", e.message.clone())
            }
            ErrorKind::TimedOut | ErrorKind::ServiceUnavailable => Fault::new("RequestCanceled", e.message.clone()),
            _ => Fault::new("SystemError", e.message.clone()).with("reason", Value::str(&e.message)),
        }
    }

    /// The fault as a `LocalizedMethodFault` (a task's `info.error`).
    pub fn localized(&self) -> Value {
        Value::Data(
            "LocalizedMethodFault",
            vec![
                ("fault", Value::Data(self.kind, self.fields.clone())),
                ("localizedMessage", Value::str(&self.message)),
            ],
        )
    }

    /// The whole response envelope.
    pub fn to_xml(&self) -> String {
        let mut out = String::from(ENVELOPE_START);
        out.push_str("<soapenv:Fault>\n<faultcode>ServerFaultCode</faultcode>\n<faultstring>");
        escape(&mut out, &self.message);
        out.push_str("</faultstring>\n<detail>\n");
        out.push_str(&format!(
            "<{}Fault xmlns=\"urn:vim25\" xsi:type=\"{}\">",
            self.kind, self.kind
        ));
        for (name, value) in &self.fields {
            value.write_field(&mut out, name);
        }
        out.push_str(&format!("</{}Fault>\n</detail>\n</soapenv:Fault>\n", self.kind));
        out.push_str(ENVELOPE_END);
        out
    }
}
