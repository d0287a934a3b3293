-- Refresh-token chains (args: tokens file, basic credentials, threads). Each connection sends
-- the refresh token the previous response returned, so every request is a real rotation.
function init(args)
  load_chain(args[1], tonumber(args[3]))
  auth = "Basic " .. args[2]
end

function request()
  return wrk.format("POST", "/oauth2/token", {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Authorization"] = auth,
  }, "grant_type=refresh_token&refresh_token=" .. token)
end

function response(status, headers, body)
  follow_chain(status, body)
end
