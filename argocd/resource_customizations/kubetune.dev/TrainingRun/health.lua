-- Argo CD health of a kubetune TrainingRun (kubetune.dev/v1alpha1).
-- Only the libraries Argo CD opens for argocd-cm scripts are used (base, table): no string/math.
local hs = {}

local function condition(kind)
  if obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "reason: message", or whichever of the two is there
local function explain(c, fallback)
  if c == nil then
    return fallback
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return c.reason or fallback
end

local function whole(x)
  return tostring(x - x % 1)
end

local function progress()
  local p = obj.status.progress
  if p == nil or p.percent == nil then
    return ""
  end
  local text = " " .. whole(p.percent) .. "%"
  if p.currentDuration ~= nil and p.totalDuration ~= nil then
    text = text .. " (" .. tostring(p.currentDuration) .. " of " .. tostring(p.totalDuration) .. ")"
  end
  if p.loss ~= nil then
    text = text .. ", loss " .. tostring(p.loss)
  end
  if p.etaSeconds ~= nil then
    text = text .. ", about " .. whole(p.etaSeconds / 60 + 0.5) .. " min left"
  end
  return text
end

local function attempt()
  local n = obj.status.attempts
  if n ~= nil and n > 1 then
    return " (attempt " .. whole(n) .. ", resumed from its latest checkpoint)"
  end
  return ""
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the run"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "The spec changed (generation " .. whole(generation) .. "); waiting for the operator to act on it"
  return hs
end

local phase = obj.status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  local model = obj.status.registeredModel
  if model ~= nil and model.name ~= nil then
    hs.message = "Registered " .. model.name .. " version " .. tostring(model.version)
  else
    hs.message = explain(condition("Succeeded"), "Succeeded")
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  local validated = condition("Validated")
  if validated ~= nil and validated.status == "False" then
    hs.message = "Invalid spec: " .. (validated.message or validated.reason or "see kubectl describe")
  else
    hs.message = "Failed: " .. explain(condition("Failed"), "see kubectl describe")
  end
elseif phase == "Cancelled" then
  hs.status = "Degraded"
  local succeeded = condition("Succeeded")
  local why = succeeded ~= nil and succeeded.message ~= nil and succeeded.message ~= "" and succeeded.message
    or "cancelled on request"
  hs.message = "Cancelled before it finished (" .. why .. "); no model was registered"
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend is true); it resumes from its latest checkpoint when lifted"
elseif phase == "Queued" then
  hs.status = "Progressing"
  local queue = obj.spec.scheduling ~= nil and obj.spec.scheduling.queueName or nil
  if queue ~= nil then
    hs.message = "Queued in " .. queue .. ": waiting for its GPUs to be admitted"
  else
    hs.message = "Queued: waiting for its GPUs"
  end
elseif phase == "Training" then
  hs.status = "Progressing"
  hs.message = "Training" .. progress() .. attempt()
elseif phase == "PreparingData" then
  hs.status = "Progressing"
  hs.message = "Preparing the training data"
elseif phase == "Registering" then
  hs.status = "Progressing"
  hs.message = "Converting and registering the model"
else
  hs.status = "Progressing"
  hs.message = phase
end
return hs
