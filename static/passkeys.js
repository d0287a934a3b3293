/* Passkeys (WebAuthn Level 3) for the hosted pages: the one script they load (CSP
 * script-src 'self'). A form with data-passkey="create" or "get" carries its options as
 * <script type="application/json" class="passkey-options">; on submit this asks the browser
 * (navigator.credentials.create / get), puts the JSON of the answer into the form's hidden
 * "credential" field and submits the form: a normal CSRF-checked post. On /login
 * (data-conditional), passkeys are also offered in the username field's autofill (§5.1.4
 * conditional mediation). Nothing here can break the password form. */
(function () {
  "use strict";

  var PKC = window.PublicKeyCredential;

  function toBuffer(text) {
    var base64 = text.replace(/-/g, "+").replace(/_/g, "/");
    base64 += "===".slice((base64.length + 3) % 4);
    var raw = atob(base64);
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes.buffer;
  }

  function toText(buffer) {
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) raw += String.fromCharCode(bytes[i]);
    return btoa(raw).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (d) {
      var out = { type: d.type, id: toBuffer(d.id) };
      if (d.transports) out.transports = d.transports;
      return out;
    });
  }

  // §5.1.10-§5.1.11 parse*OptionsFromJSON where the browser has them, else by hand.
  function creationOptions(json) {
    if (typeof PKC.parseCreationOptionsFromJSON === "function") {
      return PKC.parseCreationOptionsFromJSON(json);
    }
    var options = Object.assign({}, json);
    options.challenge = toBuffer(json.challenge);
    options.user = Object.assign({}, json.user, { id: toBuffer(json.user.id) });
    options.excludeCredentials = descriptors(json.excludeCredentials);
    return options;
  }

  function requestOptions(json) {
    if (typeof PKC.parseRequestOptionsFromJSON === "function") {
      return PKC.parseRequestOptionsFromJSON(json);
    }
    var options = Object.assign({}, json);
    options.challenge = toBuffer(json.challenge);
    options.allowCredentials = descriptors(json.allowCredentials);
    return options;
  }

  // §5.1.8 PublicKeyCredential.toJSON() where the browser has it, else by hand.
  function credentialJSON(credential) {
    if (typeof credential.toJSON === "function") {
      try {
        return credential.toJSON();
      } catch (ignored) {
        /* some password managers' objects throw: fall back */
      }
    }
    var r = credential.response;
    var response = { clientDataJSON: toText(r.clientDataJSON) };
    if (r.attestationObject) {
      response.attestationObject = toText(r.attestationObject);
      response.transports = typeof r.getTransports === "function" ? r.getTransports() : [];
    } else {
      response.authenticatorData = toText(r.authenticatorData);
      response.signature = toText(r.signature);
      if (r.userHandle) response.userHandle = toText(r.userHandle);
    }
    return {
      id: credential.id,
      rawId: toText(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: response,
    };
  }

  function explain(error, creating) {
    var name = error && error.name;
    if (name === "NotAllowedError") return "The passkey request was cancelled or timed out.";
    if (name === "InvalidStateError") {
      return creating
        ? "This device already has a passkey for your account."
        : "That passkey cannot be used here.";
    }
    if (name === "SecurityError") return "Passkeys do not work on this address.";
    if (name === "NotSupportedError") return "This device does not support passkeys.";
    return "Your browser could not use a passkey. Try again, or use another way to sign in.";
  }

  function setup(form) {
    var kind = form.getAttribute("data-passkey");
    var holder = form.querySelector("script.passkey-options");
    var field = form.querySelector('input[name="credential"]');
    var status = form.querySelector(".passkey-status");
    var button = form.querySelector('button[type="submit"]');
    if (!holder || !field || (kind !== "create" && kind !== "get")) return;

    if (!PKC || !navigator.credentials) {
      // The note inside the form (a visible form), or the one outside it that names it (a
      // form that stays hidden, as the second step's).
      var note =
        form.querySelector(".passkey-unsupported") ||
        document.querySelector('[data-unsupported-for="' + form.id + '"]');
      if (note) note.hidden = false;
      if (button) button.disabled = true;
      return; // the "get" forms stay hidden
    }
    form.hidden = false;

    var json;
    try {
      json = JSON.parse(holder.textContent);
    } catch (ignored) {
      return;
    }
    var busy = false;
    var pending = null; // the conditional request's AbortController

    function say(text) {
      if (status) status.textContent = text;
    }

    function finish(credential) {
      field.value = JSON.stringify(credentialJSON(credential));
      form.submit(); // does not fire "submit" again
    }

    function ask(mediation) {
      var publicKey = kind === "create" ? creationOptions(json) : requestOptions(json);
      if (kind === "create") return navigator.credentials.create({ publicKey: publicKey });
      var request = { publicKey: publicKey };
      if (mediation) {
        pending = new AbortController();
        request.mediation = mediation;
        request.signal = pending.signal;
      }
      return navigator.credentials.get(request);
    }

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      if (busy) return;
      if (pending) {
        pending.abort(); // one request at a time: the autofill one gives way to the button
        pending = null;
      }
      busy = true;
      say("");
      var started;
      try {
        started = ask(null);
      } catch (error) {
        started = Promise.reject(error);
      }
      started.then(
        function (credential) {
          if (credential) {
            finish(credential);
          } else {
            busy = false;
          }
        },
        function (error) {
          busy = false;
          say(explain(error, kind === "create"));
        }
      );
    });

    var target = form.getAttribute("data-conditional");
    var input = target && document.getElementById(target);
    if (kind === "get" && input && typeof PKC.isConditionalMediationAvailable === "function") {
      PKC.isConditionalMediationAvailable().then(
        function (available) {
          if (!available || busy) return;
          // §5.1.4.1: the field must ask for "webauthn" autofill.
          input.setAttribute("autocomplete", "username webauthn");
          ask("conditional").then(
            function (credential) {
              pending = null;
              if (credential) {
                busy = true;
                finish(credential);
              }
            },
            function (error) {
              pending = null;
              if (error && error.name !== "AbortError") say(explain(error, false));
            }
          );
        },
        function () {
          /* no autofill: the button still works */
        }
      );
    }
  }

  var forms = document.querySelectorAll("form[data-passkey]");
  for (var i = 0; i < forms.length; i++) {
    try {
      setup(forms[i]);
    } catch (ignored) {
      /* never break the page */
    }
  }
})();
