-- wrk script: POST a different JSON body (loadtests/wrk_bodies.py) with every request, in turn, and report the
-- answers that were not 2xx/3xx.   wrk -t2 -c64 -d20s -s loadtests/wrk_images.lua URL -- DIR COUNT
local bodies, n, i = {}, 0, 0

function init(args)
  local dir, count = args[1], tonumber(args[2])
  for k = 0, count - 1 do
    local f = assert(io.open(dir .. "/" .. k .. ".json", "rb"))
    bodies[k + 1] = f:read("*a")
    f:close()
  end
  n = count
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  i = i % n + 1
  return wrk.format(nil, nil, nil, bodies[i])
end

function done(summary, latency, requests)
  io.write(string.format("non-200 answers: %d of %d\n", summary.errors.status, summary.requests))
end
