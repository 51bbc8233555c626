"""The Datature Vi export formats, VI_JSONL (annotations only) and VI_FULL (annotations and
media), for people coming from Vi's `DatasetExportFormat` (issue 15; README "Export
formats" states the same layout).

Archive (ZIP) entries:

* VI_FULL only: `assets/<split>/<input id><ext>`, the stored original's bytes (`<ext>` from
  its content type: `.jpg`, `.png`, `.mp4`, ...), written as pages of the version arrive.
* `annotations/<split>.jsonl` for every split (empty when the split is), after the assets:
  one JSON object per input of the split, one per line (UTF-8, `\\n`-terminated), in the
  order of the version.
* `metadata.json`, last: `format` ("vi_full" or "vi_jsonl"), `coordinates` ("normalized"
  or "pixels"), `splits` (inputs per split), `assets` (media files in the archive),
  `tags` (input-level concept labels written) and `annotations` (regions written).

One line (keys marked * are present only when they apply):

* `asset_id`: the input's id. `split`: its split. `media_type`: "image", "video", "audio"
  or "text". `title`*: the input's title.
* `file_name`*: path of its media file in the archive (VI_FULL, stored media). `url`*:
  where the media are otherwise (VI_JSONL, or media only referenced by URL).
* `width`*, `height`*: pixels of an image or video whose size is known. `text`*: a text
  input's content. `geo`*: `{"latitude", "longitude"}`.
* `metadata`: the input's metadata object (`{}` when none).
* `tags`: input-level concepts, `[{"id", "name", "value"}]` (`value` 1 present, 0 absent;
  `name` the concept's name, else its ontology class's display name, else its id).
* `annotations`: the regions, each `{"id", "type", "concepts": [...as tags], ...}` with
  `confidence`* (the region's value when set), `track_id`* and, by `type`:
  "bounding_box": `bounding_box` `{"x_min", "y_min", "x_max", "y_max"}`;
  "polygon": `polygon` `[[x, y], ...]`; "point": `point` `{"x", "y"}`;
  "keypoints": `keypoints` `[{"x", "y", "visibility"*}]` (visibility "VISIBLE",
  "NOT_VISIBLE" or "NOT_PRESENT"); "mask": `mask` `{"png_base64"}` or `{"url"}` (an image
  of the input's size, not coordinates); "span": `span` `{"start", "end", "text"*}`
  (character offsets of a text).
* `frames`*: a video's annotated frames, `[{"index", "time_ms", "number", "tags",
  "annotations"}]`, their regions as above.

Coordinates: x from the left edge, y from the top. Normalized (the default, Vi's
`normalized=True`): fractions of the width and height, rounded to 6 decimals. Pixels
(`ExportOptions.pixel_coordinates`, Vi's `normalized=False`): x times the width, y times
the height, rounded to 2 decimals; the geometry of an input of unknown size cannot be
converted and its regions are left out (counted in the fidelity report as
`regions_without_image_size`). Embeddings have no place in the format and are counted.
"""

from __future__ import annotations

VI_FULL_NAME = "vi_full"
VI_JSONL_NAME = "vi_jsonl"
