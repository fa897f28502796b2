package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/scheme"
)

// The schemas are derived from the Go types that kube-apiserver itself decodes into (k8s.io/api, through
// client-go's scheme), by reflection over their JSON tags. Every struct is closed (additionalProperties: false),
// so a misspelt or misplaced field fails, and every field has its JSON type. They say nothing about required
// fields or value formats (the Go types do not carry that); the strict decoder and checks.go cover the rest.

var (
	jsonMarshaler   = reflect.TypeOf((*json.Marshaler)(nil)).Elem()
	jsonUnmarshaler = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()
)

// special are the types whose JSON form is not their Go structure.
var special = map[reflect.Type]map[string]any{
	reflect.TypeOf(resource.Quantity{}):    {"type": []string{"string", "number"}},
	reflect.TypeOf(intstr.IntOrString{}):   {"type": []string{"string", "integer"}},
	reflect.TypeOf(metav1.Time{}):          {"type": []string{"string", "null"}, "format": "date-time"},
	reflect.TypeOf(metav1.MicroTime{}):     {"type": []string{"string", "null"}, "format": "date-time"},
	reflect.TypeOf(metav1.Duration{}):      {"type": "string"},
	reflect.TypeOf(runtime.RawExtension{}): {},
}

func schemaFileName(apiVersion, kind string) string {
	// Mirrors kubeconform's {{ .ResourceKind }}{{ .KindSuffix }}: kind lower-cased, then "-" and the first
	// dot-separated label of the group (if any), then "-" and the version.
	group, version := "", apiVersion
	if i := strings.Index(apiVersion, "/"); i >= 0 {
		group, version = apiVersion[:i], apiVersion[i+1:]
	}
	suffix := ""
	if group != "" {
		suffix = "-" + strings.ToLower(strings.Split(group, ".")[0])
	}
	return strings.ToLower(kind) + suffix + "-" + strings.ToLower(version) + ".json"
}

func writeSchemas(dir string) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, err
	}
	n := 0
	gvks := scheme.Scheme.AllKnownTypes()
	names := make([]string, 0, len(gvks))
	byName := map[string]reflect.Type{}
	for gvk, t := range gvks {
		if gvk.Version == runtime.APIVersionInternal || strings.HasSuffix(gvk.Kind, "List") ||
			gvk.Kind == "WatchEvent" || strings.HasSuffix(gvk.Kind, "Options") {
			continue
		}
		name := schemaFileName(gvk.GroupVersion().String(), gvk.Kind)
		names = append(names, name)
		byName[name] = t
	}
	sort.Strings(names)
	for _, name := range names {
		s := schemaFor(byName[name], map[reflect.Type]bool{})
		s["$schema"] = "http://json-schema.org/schema#"
		data, err := json.MarshalIndent(s, "", "  ")
		if err != nil {
			return n, fmt.Errorf("%s: %w", name, err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

func nullable(s map[string]any) map[string]any {
	switch t := s["type"].(type) {
	case string:
		s["type"] = []string{t, "null"}
	case []string:
		for _, x := range t {
			if x == "null" {
				return s
			}
		}
		s["type"] = append(append([]string{}, t...), "null")
	}
	return s
}

func schemaFor(t reflect.Type, seen map[reflect.Type]bool) map[string]any {
	if s, ok := special[t]; ok {
		out := map[string]any{}
		for k, v := range s {
			out[k] = v
		}
		return out
	}
	switch t.Kind() {
	case reflect.Pointer:
		return nullable(schemaFor(t.Elem(), seen))
	case reflect.Interface:
		return map[string]any{}
	case reflect.Bool:
		return map[string]any{"type": "boolean"}
	case reflect.String:
		return map[string]any{"type": "string"}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return map[string]any{"type": "integer"}
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return map[string]any{"type": "integer", "minimum": 0}
	case reflect.Float32, reflect.Float64:
		return map[string]any{"type": "number"}
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 {
			return map[string]any{"type": []string{"string", "null"}} // []byte: base64 text
		}
		return map[string]any{"type": []string{"array", "null"}, "items": schemaFor(t.Elem(), seen)}
	case reflect.Map:
		return map[string]any{"type": []string{"object", "null"}, "additionalProperties": schemaFor(t.Elem(), seen)}
	case reflect.Struct:
		// A type with its own JSON encoding that we do not know: accept anything rather than guess.
		if t.Implements(jsonMarshaler) || reflect.PointerTo(t).Implements(jsonUnmarshaler) {
			return map[string]any{}
		}
		if seen[t] { // recursive type: stop here
			return map[string]any{}
		}
		seen[t] = true
		defer delete(seen, t)
		props := map[string]any{}
		addStructFields(t, props, seen)
		return map[string]any{"type": "object", "properties": props, "additionalProperties": false}
	default:
		return map[string]any{}
	}
}

func addStructFields(t reflect.Type, props map[string]any, seen map[reflect.Type]bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		if tag == "-" || (!f.IsExported() && !f.Anonymous) {
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		inline := strings.Contains(","+opts+",", ",inline,") || (f.Anonymous && name == "")
		if inline {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				addStructFields(ft, props, seen)
				continue
			}
		}
		if name == "" {
			name = f.Name
		}
		props[name] = schemaFor(f.Type, seen)
	}
}
