-- A mixed workload per connection (args: tokens file, app basic, cc basic, rs basic, access
-- token, username, password, threads): 35% client_credentials, 30% refresh (a chain per
-- connection), 15% introspection, 15% JWKS, 5% password.
local kind = nil
local form = "application/x-www-form-urlencoded"

function init(args)
  load_chain(args[1], tonumber(args[8]))
  app, cc, rs = "Basic " .. args[2], "Basic " .. args[3], "Basic " .. args[4]
  access, username, password = args[5], args[6], args[7]
  math.randomseed(index * 7919)
end

function request()
  local roll = math.random(100)
  if roll <= 35 then
    kind = "cc"
    return wrk.format("POST", "/oauth2/token", {["Content-Type"] = form, ["Authorization"] = cc},
      "grant_type=client_credentials")
  elseif roll <= 65 then
    kind = "refresh"
    return wrk.format("POST", "/oauth2/token", {["Content-Type"] = form, ["Authorization"] = app},
      "grant_type=refresh_token&refresh_token=" .. token)
  elseif roll <= 80 then
    kind = "introspect"
    return wrk.format("POST", "/oauth2/introspect",
      {["Content-Type"] = form, ["Authorization"] = rs}, "token=" .. access)
  elseif roll <= 95 then
    kind = "jwks"
    return wrk.format("GET", "/.well-known/jwks.json")
  end
  kind = "password"
  return wrk.format("POST", "/oauth2/token", {["Content-Type"] = form, ["Authorization"] = app},
    "grant_type=password&username=" .. username .. "&password=" .. password)
end

function response(status, headers, body)
  if kind == "refresh" then
    follow_chain(status, body)
  end
end
