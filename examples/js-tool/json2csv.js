// json2csv: a JSON array of objects on standard input, as CSV (RFC 4180) on standard output.
//
// Usage: json2csv.js [COLUMN]...
//
// The columns are the ones named, in that order, or else every key of the first object. A value
// that is missing or null is an empty field; an object or array is written as JSON. A field
// holding a comma, a double quote or a line break is quoted, its quotes doubled. Input that is
// not a JSON array of objects is an error (exit 1, with the reason on stderr).

function field(value) {
  if (value === undefined || value === null) return "";
  const text = typeof value === "object" ? JSON.stringify(value) : String(value);
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function main(args) {
  const rows = JSON.parse(std.in.readAsString());
  if (!Array.isArray(rows) || rows.some((r) => r === null || typeof r !== "object" || Array.isArray(r))) {
    throw new TypeError("the input is not a JSON array of objects");
  }
  const columns = args.length > 0 ? args : rows.length > 0 ? Object.keys(rows[0]) : [];
  const lines = [columns.map(field).join(",")];
  for (const row of rows) {
    lines.push(columns.map((c) => field(row[c])).join(","));
  }
  std.out.puts(lines.join("\r\n") + "\r\n");
}

main(scriptArgs.slice(1));
