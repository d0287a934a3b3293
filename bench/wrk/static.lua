-- One fixed request (args: method, path, basic credentials or "-", body or "-").
function init(args)
  wrk.method = args[1]
  wrk.path = args[2]
  if args[3] ~= "-" then
    wrk.headers["Authorization"] = "Basic " .. args[3]
  end
  if args[4] ~= "-" then
    wrk.body = args[4]
    wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
  end
end
