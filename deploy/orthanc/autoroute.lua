-- Orthanc auto-routing to the liverfat node: every stable CT series is sent to it once.
--
-- Install: list this file in Orthanc's "LuaScripts", and register the node in
-- "DicomModalities" under the name below (see orthanc.json next to this file).
-- The node sends its results (SEG, SR, key image: modalities SEG, SR and OT) back into the
-- same study; they are not CT, so they are never routed again.
--
-- OnStableSeries runs when no instance has arrived for "StableAge" seconds. The store
-- runs as an asynchronous Orthanc job, so a node that is down does not block Orthanc; a
-- failed job is listed under /jobs and can be resubmitted from there.
-- (SendToModality() is not used: in Orthanc 1.10 it treats the series id as an instance.)

local LIVERFAT = 'LIVERFAT'  -- the node's key in DicomModalities

function OnStableSeries(seriesId, tags, metadata)
   if tags['Modality'] ~= 'CT' then
      return
   end
   local body = '{"Resources":["' .. seriesId .. '"],"Asynchronous":true}'
   local answer = RestApiPost('/modalities/' .. LIVERFAT .. '/store', body, true)
   print('liverfat: CT series ' .. seriesId .. ' queued for ' .. LIVERFAT .. ': ' .. answer)
end
